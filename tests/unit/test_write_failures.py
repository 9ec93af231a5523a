"""Issue 24: a write that fails for lack of space (or any OS error) ends in one line naming the path, the cause
and the free space; atomicity as before (the old output intact, no temporary sibling left)."""

from __future__ import annotations

import errno
import os

import pytest

from dpo_pipeline import io
from dpo_pipeline.errors import StageError


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_inside_an_output_folder_is_one_line_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "models" / "merged"
    out.mkdir(parents=True)
    (out / "old.safetensors").write_bytes(b"old")
    with pytest.raises(StageError) as info:
        with io.atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            no_space()
    message = str(info.value)
    assert message.startswith(f"{out}: writing it failed (No space left on device; ")
    assert "MiB free on its disk" in message and "\n" not in message
    assert [p.name for p in out.iterdir()] == ["old.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # no temporary sibling left


def test_a_library_io_error_that_is_no_oserror_is_named_too(tmp_path):
    """safetensors reports a full disk as its own error type, with the OS error in the message."""

    class SafetensorError(Exception):
        pass

    with pytest.raises(StageError, match=r"writing it failed \(Error while serializing: .*os error 28"):
        with io.atomic_dir(tmp_path / "adapter"):
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, message: "No space left on device" (os error 28)'
            )


def test_other_errors_inside_an_output_folder_propagate_unchanged(tmp_path):
    with pytest.raises(StageError, match="fidelity check failed"):
        with io.atomic_dir(tmp_path / "merged"):
            raise StageError("fidelity check failed")
    with pytest.raises(ValueError, match="a bug"):
        with io.atomic_dir(tmp_path / "merged"):
            raise ValueError("a bug")


def test_a_full_disk_writing_a_file_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "metrics" / "train.json"
    target.parent.mkdir()
    target.write_text("{}")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StageError, match=r"train\.json: writing it failed \(No space left on device"):
        io.write_json(target, {"a": 1})
    assert target.read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["train.json"]
