"""Lineage: what produced a run's inputs. Git state, library versions, DVC's own content hashes from dvc.lock
(or `<path>.dvc`), our sha256 only for what DVC has not recorded, and the params sections a stage declares."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "lm_eval",
    "dvc",
    "mlflow",
)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    branch = _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"
    # Untracked outputs are ignored by .gitignore/dvc; any tracked change (params, code) makes it dirty.
    # dvc.lock and the git-tracked metrics/ are written (or first removed) by `dvc repro` itself: not dirt.
    dirty = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock", ":(exclude)metrics"
    )
    return {
        "git.commit": commit,
        "git.branch": branch,
        "git.dirty": str(bool(dirty)).lower(),
        "mlflow.source.git.commit": commit,
    }


# What `dvc exp run` (workspace, --temp or a queued run) puts in each stage's environment (dvc/env.py, DVC 3.x: the
# queue's _stash_exp sets both for every experiment, a generated name when -n is not given).
EXP_NAME_ENV = "DVC_EXP_NAME"
EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"


def experiment_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`dvc.exp.name` and `dvc.exp.baseline` for a stage run under `dvc exp run` (the experiment's name and the
    commit it started from: the commit its params differ from), nothing under a plain `dvc repro`."""
    import os

    env = os.environ if environ is None else environ
    name, baseline = env.get(EXP_NAME_ENV, ""), env.get(EXP_BASELINE_ENV, "")
    if not name:
        return {}
    return {"dvc.exp.name": name, "dvc.exp.baseline": baseline or "unknown"}


def params_fingerprint(declared: dict[str, Any]) -> str:
    """sha256 (first 16 hex) of the params a stage declares, canonical JSON: two runs with the same value ran with
    the same settings, whatever their commit or experiment."""
    import hashlib
    import json

    payload = json.dumps(declared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def library_tags() -> dict[str, str]:
    tags = {"version.python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            tags[f"version.{name}"] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            tags[f"version.{name}"] = "not-installed"
    return tags


def _lock_entries(lock_file: Path) -> list[dict[str, Any]]:
    import yaml

    if not lock_file.exists():
        return []
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return []
    return [entry for stage in (lock.get("stages") or {}).values() for entry in stage.get("outs", [])]


def _size_and_count(path: Path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def _dvc_file_entries(path: Path) -> list[dict[str, Any]]:
    """The outs of `<path>.dvc` (data brought in with `dvc add`), if there is one."""
    import yaml

    dvc_file = path.parent / (path.name + ".dvc")
    if not dvc_file.is_file():
        return []
    try:
        outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs", [])
    except yaml.YAMLError:
        return []
    return [{**entry, "path": (path.parent / entry.get("path", "")).as_posix()} for entry in outs]


def dvc_lock_md5(path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for `path` as a stage's output in dvc.lock (or in `<path>.dvc` after `dvc add`),
    if the path still has the size (and, for a folder, the file count) recorded with it; None otherwise.
    Only outputs count: a stage's deps in dvc.lock are from its previous run, stale by definition while it
    runs again. Reads file sizes, never contents."""
    wanted = Path(path).as_posix().rstrip("/")
    for entry in _lock_entries(Path(lock_file)) + _dvc_file_entries(Path(path)):
        if Path(entry.get("path", "")).as_posix().rstrip("/") != wanted or not entry.get("md5"):
            continue
        target = Path(path)
        if not target.exists():
            return None
        size, count = _size_and_count(target)
        if entry.get("size") not in (None, size) or entry.get("nfiles") not in (None, count):
            return None  # changed since DVC recorded it (a stage run by hand): not DVC's content any more
        return entry["md5"]
    return None


def lineage_hash(path: str | Path, lock_file: str | Path = "dvc.lock") -> str:
    """The content hash lineage tags and staleness records use: "md5:<DVC's md5>" when dvc.lock records the
    path as an output (see dvc_lock_md5), else "sha256:<ours>" (a path DVC does not track, or a stage run
    outside `dvc repro`: the tests), "missing" when it does not exist."""
    from dpo_pipeline.io import sha256_tree

    md5 = dvc_lock_md5(path, lock_file)
    if md5:
        return f"md5:{md5}"
    return f"sha256:{sha256_tree(path)}" if Path(path).exists() else "missing"


def input_hashes(run: Any, inputs: dict[str, str | Path]) -> dict[str, str]:
    """lineage_hash of each input: the values the run's tags already hold, else worked out here (on the
    ranks that open no run)."""
    tags = getattr(getattr(run, "data", None), "tags", None) or {}
    return {name: tags.get(f"input.{name}.hash") or lineage_hash(path) for name, path in inputs.items()}


def params_for(params: Params, sections: list[str]) -> dict[str, Any]:
    """The declared params (dotted names as in dvc.yaml) as a nested dict of plain data."""
    import dataclasses

    from dpo_pipeline.params_trace import plain as untraced

    plain = dataclasses.asdict(untraced(params))
    picked: dict[str, Any] = {}
    for dotted in sections:
        value: Any = plain
        for part in dotted.split("."):
            value = value[part]
        picked[dotted] = value
    return picked
