"""tools.verify: DVC's hash semantics and the checks, on a hand-built cache (no dvc process)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tools import verify
from tools.verify import Output


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_manifest_hash_matches_dvc():
    # Recorded from `dvc add d` (DVC 3.67) with d/a.txt = "a\n" and d/sub/b.txt = "b\n".
    entries = [{"relpath": "sub/b.txt", "md5": md5(b"b\n")}, {"relpath": "a.txt", "md5": md5(b"a\n")}]
    assert verify.manifest_hash(entries) == "849835d274483dc683eb416d6e4f887d.dir"


def test_md5_file_is_plain_md5_and_legacy_differs_on_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"x\r\ny\r\n")
    assert verify.md5_file(path) == md5(b"x\r\ny\r\n")
    assert verify.md5_file(path, "md5-dos2unix") == md5(b"x\ny\n")


class FakeProject:
    """A workspace and a DVC-3-layout cache (files/md5/ab/cdef...) written by hand."""

    def __init__(self, root: Path):
        self.root = root / "ws"
        self.cache = root / "cache" / "files" / "md5"
        self.root.mkdir()

    def object_path(self, out: Output, oid: str) -> Path:
        return self.cache / oid[:2] / oid[2:]

    def store(self, data: bytes, oid: str | None = None) -> str:
        oid = oid or md5(data)
        path = self.cache / oid[:2] / oid[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return oid

    def add_dir(self, rel: str, files: dict[str, bytes]) -> Output:
        entries = []
        for name, data in files.items():
            path = self.root / rel / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            entries.append({"md5": self.store(data), "relpath": name})
        oid = verify.manifest_hash(entries)
        listing = sorted(entries, key=lambda e: e["relpath"])
        self.store(json.dumps(listing, sort_keys=True).encode(), oid)
        return Output(path=rel, oid=oid, hash_name="md5", use_cache=True, stage="train")

    def add_file(self, rel: str, data: bytes, use_cache: bool = True) -> Output:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if use_cache:
            self.store(data)
        return Output(path=rel, oid=md5(data), hash_name="md5", use_cache=use_cache, stage="prepare")


@pytest.fixture
def project(tmp_path):
    return FakeProject(tmp_path)


def test_intact_outputs_pass(project):
    d = project.add_dir("models/adapter", {"a.safetensors": b"weights", "cfg/c.json": b"{}"})
    f = project.add_file("metrics/train.json", b'{"loss": 1}', use_cache=False)
    ws = verify.check_workspace_output(d, project.root, project.object_path)
    ws.extend(verify.check_workspace_output(f, project.root, project.object_path))
    cache = verify.check_cache_output(d, project.object_path, project.root)
    assert ws.problems == [] and cache.problems == []
    assert ws.files_checked == 3
    assert cache.objects_checked == 3  # the manifest and its two files


def test_corrupted_workspace_file_is_named(project):
    d = project.add_dir("models/adapter", {"a.safetensors": b"weights", "b.json": b"{}"})
    path = project.root / "models/adapter/a.safetensors"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify.check_workspace_output(d, project.root, project.object_path)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("MISMATCH   models/adapter/a.safetensors: md5")
    assert "b.json" not in report.problems[0]


def test_missing_and_extra_files_in_a_folder(project):
    d = project.add_dir("data/prepared", {"train.parquet": b"t", "test.parquet": b"s"})
    (project.root / "data/prepared/test.parquet").unlink()
    (project.root / "data/prepared/.train.parquet.tmp-1234").write_bytes(b"half")
    problems = verify.check_workspace_output(d, project.root, project.object_path).problems
    assert any(p.startswith("MISSING    data/prepared/test.parquet") for p in problems)
    assert any(p.startswith("EXTRA      data/prepared/.train.parquet.tmp-1234") for p in problems)


def test_ignored_files_are_skipped(project):
    d = project.add_dir("data/prepared", {"train.parquet": b"t"})
    (project.root / "data/prepared/__pycache__").mkdir()
    (project.root / "data/prepared/__pycache__/x.pyc").write_bytes(b"")
    report = verify.check_workspace_output(
        d, project.root, project.object_path, ignored=lambda p: p.name == "__pycache__"
    )
    assert report.problems == []


def test_folder_without_manifest_falls_back_to_whole_hash(project):
    d = project.add_dir("models/base", {"m.safetensors": b"m"})
    project.object_path(d, d.oid).unlink()
    assert verify.check_workspace_output(d, project.root, project.object_path).problems == []
    (project.root / "models/base/m.safetensors").write_bytes(b"M")
    (problem,) = verify.check_workspace_output(d, project.root, project.object_path).problems
    assert "models/base (stage train): folder hash" in problem


def test_single_file_output_and_absent_output(project):
    f = project.add_file("metrics/data.json", b'{"rows": 3}', use_cache=False)
    (project.root / "metrics/data.json").write_bytes(b'{"rows": 4}')
    (problem,) = verify.check_workspace_output(f, project.root, project.object_path).problems
    assert problem.startswith("MISMATCH   metrics/data.json: md5")
    gone = Output(path="models/merged", oid="0" * 32 + ".dir", hash_name="md5", use_cache=True, stage="merge")
    report = verify.check_workspace_output(gone, project.root, project.object_path)
    assert report.problems == [] and report.notes[0].startswith("absent     models/merged")


def test_corrupted_cache_object_is_named_with_its_output_file(project):
    d = project.add_dir("models/adapter", {"a.safetensors": b"weights", "b.json": b"{}"})
    bad = project.object_path(d, md5(b"weights"))
    bad.write_bytes(b"weightz")
    (problem,) = verify.check_cache_output(d, project.object_path, project.root).problems
    assert problem.startswith(f"CORRUPT    cache object {bad} (models/adapter/a.safetensors, stage train)")
    # the workspace copy is still good: the workspace check stays clean
    assert verify.check_workspace_output(d, project.root, project.object_path).problems == []


def test_corrupted_manifest_is_named(project):
    d = project.add_dir("models/adapter", {"a.safetensors": b"weights"})
    manifest = project.object_path(d, d.oid)
    manifest.write_bytes(manifest.read_bytes().replace(b"a.safetensors", b"b.safetensors"))
    (problem,) = verify.check_cache_output(d, project.object_path, project.root).problems
    assert f"cache object {manifest}" in problem and "name says" in problem
    manifest.write_bytes(b"not json")
    (problem,) = verify.check_cache_output(d, project.object_path, project.root).problems
    assert "unreadable manifest" in problem


def test_uncached_output_has_no_cache_check(project):
    f = project.add_file("metrics/eval.json", b"{}", use_cache=False)
    assert verify.check_cache_output(f, project.object_path, project.root).objects_checked == 0


def test_check_all_objects_finds_unreferenced_corruption(project):
    project.add_dir("models/adapter", {"a.safetensors": b"weights"})
    orphan = project.store(b"from another branch")
    (project.cache / orphan[:2] / orphan[2:]).write_bytes(b"bit rot")
    report = verify.check_all_objects(project.cache)
    assert report.objects_checked == 3
    (problem,) = report.problems
    assert orphan[2:] in problem


def test_a_lost_cache_object_is_a_problem_while_the_workspace_holds_the_output(project):
    """Issue 24: with its cache object deleted, the workspace copy is the only one left (`dvc push` of it is
    impossible): a problem naming the repair, not a note. Absent from both (a fresh clone): a note."""
    d = project.add_dir("models/adapter", {"a.safetensors": b"weights", "b.json": b"{}"})
    lost = project.object_path(d, md5(b"weights"))
    lost.unlink()
    (problem,) = verify.check_cache_output(d, project.object_path, project.root).problems
    assert problem.startswith(f"LOST       cache object of models/adapter/a.safetensors, stage train: {lost}")
    assert "dvc commit -f train" in problem and "dvc pull" in problem
    project.object_path(d, d.oid).unlink()
    (problem,) = verify.check_cache_output(d, project.object_path, project.root).problems
    assert problem.startswith("LOST       cache object of models/adapter (stage train)")
    import shutil

    shutil.rmtree(project.root / "models/adapter")
    report = verify.check_cache_output(d, project.object_path, project.root)
    assert report.problems == [] and report.notes[0].startswith("absent     cache object of models/adapter")
