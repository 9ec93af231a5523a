"""lineage.lineage_hash: DVC's md5 from dvc.lock for what a stage produced (no contents read), our sha256
only for what DVC does not record, and never a stale record."""

from __future__ import annotations

import yaml

from dpo_pipeline import lineage
from dpo_pipeline.io import sha256_file, sha256_tree


def write_lock(root, outs, deps=()):
    lock = {"schema": "2.0", "stages": {"producer": {"cmd": "x", "deps": list(deps), "outs": list(outs)}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root / "dvc.lock"


def test_an_output_in_dvc_lock_is_named_by_dvcs_md5_without_reading_it(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"12345")
    (folder / "b.json").write_text("{}")
    lock = write_lock(tmp_path, [{"path": "models/base", "md5": "abc.dir", "size": 7, "nfiles": 2}])
    monkeypatch.chdir(tmp_path)

    def no_reading(*_a, **_k):
        raise AssertionError("a path dvc.lock records must not be hashed again")

    monkeypatch.setattr("dpo_pipeline.io.sha256_tree", no_reading)
    assert lineage.lineage_hash("models/base", lock) == "md5:abc.dir"


def test_a_changed_output_or_a_dep_falls_back_to_our_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    out, dep = tmp_path / "data" / "out.txt", tmp_path / "data" / "raw.txt"
    out.write_text("longer than recorded")
    dep.write_text("raw")
    lock = write_lock(
        tmp_path,
        [{"path": "data/out.txt", "md5": "old", "size": 3}],
        [{"path": "data/raw.txt", "md5": "dep-md5", "size": 3}],
    )
    # the size differs from dvc.lock's record: a stage re-ran by hand, so dvc.lock's md5 is not its content
    assert lineage.lineage_hash("data/out.txt", lock) == f"sha256:{sha256_file(out)}"
    # a dep's record is from the stage's previous run: stale by definition while the stage runs again
    assert lineage.lineage_hash("data/raw.txt", lock) == f"sha256:{sha256_file(dep)}"
    assert lineage.lineage_hash("data/absent", lock) == "missing"
    assert lineage.lineage_hash(tmp_path / "data", lock) == f"sha256:{sha256_tree(tmp_path / 'data')}"


def test_data_added_with_dvc_add_is_named_by_its_dvc_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"a": 1}\n')
    (tmp_path / "raw.jsonl.dvc").write_text(
        yaml.safe_dump({"outs": [{"path": "raw.jsonl", "md5": "f00d", "size": raw.stat().st_size}]})
    )
    assert lineage.lineage_hash("raw.jsonl", tmp_path / "no.lock") == "md5:f00d"
