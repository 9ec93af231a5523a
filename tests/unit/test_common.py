"""Atomic outputs: a crash leaves the old output or none, and a killed writer's leftovers are cleaned."""

from __future__ import annotations

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, atomic_write_bytes, remove_stale_temps, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path):
    tmp_path = tmp_path / "outputs"
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("crash mid-write")
    assert (out / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temp_siblings_of_a_killed_writer_are_removed(tmp_path):
    out = tmp_path / "merged"
    dead_dir = tmp_path / ".merged.tmp-deadbeef"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x" * 10)
    other = tmp_path / ".adapter.tmp-deadbeef"  # another output's temp: not ours to remove
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("ok")
    assert not dead_dir.exists()
    assert other.exists()

    dead_file = tmp_path / ".eval.json.tmp-0badf00d"
    dead_file.write_text("{")
    write_json(tmp_path / "eval.json", {"a": 1.0})
    assert not dead_file.exists()
    assert remove_stale_temps(tmp_path / "eval.json") == []


def test_atomic_write_bytes_keeps_old_file_on_failure(tmp_path, monkeypatch):
    tmp_path = tmp_path / "metrics"
    target = tmp_path / "m.json"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(StageError, match=r"m\.json: writing it failed \(disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
