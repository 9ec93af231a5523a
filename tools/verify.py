"""verify: re-hash the workspace outputs and the local DVC cache against dvc.lock; name every bad file.

    python -m tools.verify [--workspace] [--cache] [--all-cache]        (make verify)

Why: DVC trusts its cache. `dvc checkout` and `dvc push` copy cache objects without re-hashing them, so
a flipped bit in .dvc/cache spreads silently; and `dvc status` only notices a workspace change when
the file's size or mtime moved. This command recomputes every hash the way DVC does and compares.

Reads: dvc.lock and *.dvc files (through DVC's own index: every stage output and every `dvc add`ed
file), the workspace copies of those outputs, and the local cache (wherever `dvc cache dir` points).
Writes: nothing.

Hash semantics (DVC 3, `hash: md5`): a file's hash is the md5 of its bytes; a directory's hash is the md5
of its manifest, the JSON list `[{"md5": ..., "relpath": ...}, ...]` sorted by relpath and dumped with
sorted keys, plus the suffix `.dir`. The manifest itself is a cache object named by that hash. Outputs
recorded by DVC 2 (no `hash:` field, `md5-dos2unix`) are hashed with DVC's own legacy function.

Checks (both by default; `--workspace` or `--cache` picks one):
- workspace: each output present in the work tree matches dvc.lock; for a directory every file is
  compared with the manifest, so the report names the exact file (and any missing or extra file).
- cache: each object dvc.lock refers to (directory manifests and the files they list) still hashes to
  its own name. `--all-cache` re-hashes every object in the cache, also those of other branches and
  experiments.
An output absent from both the workspace and the cache (a fresh clone before `dvc pull`) is reported but is
not an error; a cache object that is gone while the workspace still holds the output is one (LOST: the
workspace copy is the only one left, `dvc push` cannot send it and `dvc checkout` cannot restore it). Exit status: 0 when nothing is corrupted, 1 otherwise (every problem is printed first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dpo_pipeline.errors import StageError
from dpo_pipeline.runner import run_main

DIR_SUFFIX = ".dir"


@dataclass(frozen=True)
class Output:
    """One output as dvc.lock (or a .dvc file) records it."""

    path: str  # relative to the repo root, as written in dvc.yaml / the .dvc file
    oid: str  # md5, with `.dir` for a directory
    hash_name: str  # "md5" (DVC 3) or "md5-dos2unix" (DVC 2 legacy)
    use_cache: bool  # False for `cache: false` metrics and plots (kept in git)
    stage: str


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # corruption: makes the exit status 1
    notes: list[str] = field(default_factory=list)  # absent things: reported, not an error
    files_checked: int = 0
    objects_checked: int = 0

    def extend(self, other: Report) -> None:
        self.problems += other.problems
        self.notes += other.notes
        self.files_checked += other.files_checked
        self.objects_checked += other.objects_checked


def md5_file(path: str | Path, hash_name: str = "md5") -> str:
    """DVC's file hash (its own function, so legacy md5-dos2unix outputs hash as DVC 2 did)."""
    from dvc_data.hashfile.hash import file_md5

    return file_md5(os.fspath(path), name=hash_name)


def manifest_hash(entries: Iterable[dict]) -> str:
    """DVC's directory hash: md5 of the sorted manifest JSON, plus `.dir`."""
    listing = sorted(
        ({"md5": e["md5"], "relpath": e["relpath"]} for e in entries), key=lambda e: e["relpath"]
    )
    data = json.dumps(listing, sort_keys=True).encode("utf-8")
    return hashlib.md5(data).hexdigest() + DIR_SUFFIX


def read_manifest(path: str | Path) -> list[dict]:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, list) or not all(
        isinstance(e, dict) and "md5" in e and "relpath" in e for e in raw
    ):
        raise ValueError("not a DVC directory manifest (expected a list of {md5, relpath})")
    return raw


def list_files(root: Path, ignored: Callable[[Path], bool] = lambda p: False) -> dict[str, Path]:
    """Files under a directory by posix relpath (symlinks followed, as DVC does for outputs)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not ignored(Path(dirpath) / d)]
        for name in filenames:
            full = Path(dirpath) / name
            if not ignored(full):
                found[full.relative_to(root).as_posix()] = full
    return found


def check_workspace_output(
    out: Output,
    root: Path,
    object_path: Callable[[Output, str], Path],
    ignored: Callable[[Path], bool] = lambda p: False,
) -> Report:
    """Compare one workspace output with dvc.lock; name each file that differs."""
    report = Report()
    where = root / out.path
    label = f"{out.path} (stage {out.stage})"
    if not where.exists():
        report.notes.append(f"absent     {label}: not in the workspace (dvc pull / dvc checkout restores it)")
        return report
    if not out.oid.endswith(DIR_SUFFIX):
        if where.is_dir():
            report.problems.append(f"MISMATCH   {label}: dvc.lock records a file, the workspace has a folder")
            return report
        actual = md5_file(where, out.hash_name)
        report.files_checked += 1
        if actual != out.oid:
            report.problems.append(
                f"MISMATCH   {out.path}: md5 {actual}, dvc.lock has {out.oid} (stage {out.stage})"
            )
        return report
    if not where.is_dir():
        report.problems.append(f"MISMATCH   {label}: dvc.lock records a folder, the workspace has a file")
        return report
    files = list_files(where, ignored)
    manifest_file = object_path(out, out.oid)
    manifest = None
    if manifest_file.exists():
        try:
            manifest = read_manifest(manifest_file)
        except ValueError as err:
            report.problems.append(f"CORRUPT    cache manifest {manifest_file} of {label}: {err}")
        else:
            if manifest_hash(manifest) != out.oid:
                manifest = None  # the cache check names it; fall back to the whole-folder hash below
    if manifest is None:
        actual_entries = [{"md5": md5_file(p, out.hash_name), "relpath": rel} for rel, p in files.items()]
        report.files_checked += len(files)
        actual = manifest_hash(actual_entries)
        if actual != out.oid:
            report.problems.append(
                f"MISMATCH   {label}: folder hash {actual}, dvc.lock has {out.oid} "
                "(no intact manifest in the cache to name the file)"
            )
        return report
    expected = {e["relpath"]: e["md5"] for e in manifest}
    for rel in sorted(expected):
        if rel not in files:
            report.problems.append(
                f"MISSING    {out.path}/{rel}: listed in dvc.lock's manifest (stage {out.stage})"
            )
            continue
        actual = md5_file(files[rel], out.hash_name)
        report.files_checked += 1
        if actual != expected[rel]:
            report.problems.append(
                f"MISMATCH   {out.path}/{rel}: md5 {actual}, dvc.lock has {expected[rel]} (stage {out.stage})"
            )
    for rel in sorted(set(files) - set(expected)):
        report.problems.append(f"EXTRA      {out.path}/{rel}: not in dvc.lock's manifest (stage {out.stage})")
    return report


def check_object(path: Path, oid: str, hash_name: str, what: str) -> Report:
    """A cache object must hash to its own name (a manifest by its parsed content, as DVC computes it)."""
    report = Report(objects_checked=1)
    if oid.endswith(DIR_SUFFIX):
        try:
            actual = manifest_hash(read_manifest(path))
        except (ValueError, UnicodeDecodeError) as err:
            report.problems.append(f"CORRUPT    cache object {path} ({what}): unreadable manifest: {err}")
            return report
    else:
        actual = md5_file(path, hash_name)
    if actual != oid:
        report.problems.append(
            f"CORRUPT    cache object {path} ({what}): content md5 {actual}, name says {oid}"
        )
    return report


def check_cache_output(out: Output, object_path: Callable[[Output, str], Path], root: Path) -> Report:
    """Re-hash the cache objects of one output (its manifest and every file it lists)."""
    report = Report()
    if not out.use_cache:
        return report
    in_workspace = (root / out.path).exists()

    def absent(what: str, object_file: Path) -> None:
        if in_workspace:
            report.problems.append(
                f"LOST       cache object of {what}: {object_file} is gone while {out.path} is in the workspace "
                f"(its only copy: `dvc commit -f {out.stage}` puts it back in the cache, or `dvc pull`)"
            )
        else:
            report.notes.append(f"absent     cache object of {what}: {object_file}")

    path = object_path(out, out.oid)
    if not path.exists():
        absent(f"{out.path} (stage {out.stage})", path)
        return report
    report.extend(check_object(path, out.oid, out.hash_name, f"{out.path}, stage {out.stage}"))
    if not out.oid.endswith(DIR_SUFFIX) or report.problems:
        return report
    for entry in read_manifest(path):
        entry_path = object_path(out, entry["md5"])
        what = f"{out.path}/{entry['relpath']}, stage {out.stage}"
        if not entry_path.exists():
            absent(what, entry_path)
            continue
        report.extend(check_object(entry_path, entry["md5"], out.hash_name, what))
    return report


def check_all_objects(cache_root: Path, hash_name: str = "md5") -> Report:
    """Re-hash every object under a cache root laid out as <2 hex>/<30 hex>[.dir]."""
    report = Report()
    if not cache_root.is_dir():
        return report
    for prefix in sorted(p for p in cache_root.iterdir() if p.is_dir() and len(p.name) == 2):
        for obj in sorted(prefix.iterdir()):
            if obj.is_file() and not obj.name.startswith("."):
                report.extend(check_object(obj, prefix.name + obj.name, hash_name, "cache"))
    return report


def collect_outputs(repo) -> list[Output]:
    """Every output of dvc.yaml (hashes from dvc.lock) and of *.dvc files, via DVC's own index."""
    outputs = []
    for out in repo.index.outs:
        if not out.hash_info or not out.hash_info.value:
            continue  # the stage never ran: nothing recorded to check
        rel = Path(out.fs_path).resolve().relative_to(Path(repo.root_dir).resolve()).as_posix()
        outputs.append(
            Output(
                path=rel,
                oid=out.hash_info.value,
                hash_name=out.hash_info.name or "md5",
                use_cache=bool(out.use_cache),
                stage=out.stage.addressing,
            )
        )
    return sorted(outputs, key=lambda o: o.path)


def verify(
    root: str | Path = ".", workspace: bool = True, cache: bool = True, all_cache: bool = False
) -> Report:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    try:
        repo = Repo(os.fspath(root))
    except DvcException as err:
        raise StageError(f"{root}: not a DVC repository ({err})") from err
    try:
        odbs = {repo.cache.local.hash_name: Path(repo.cache.local.path)}
        odbs[repo.cache.legacy.hash_name] = Path(repo.cache.legacy.path)
        outputs = collect_outputs(repo)

        def object_path(out: Output, oid: str) -> Path:
            base = odbs.get(out.hash_name, odbs["md5"])
            return base / oid[:2] / oid[2:]

        def ignored(path: Path) -> bool:
            return repo.dvcignore.is_ignored(repo.fs, os.fspath(path))

        report = Report()
        if not outputs:
            report.notes.append("nothing to verify: no output is recorded in dvc.lock or a .dvc file")
        for out in outputs:
            if workspace:
                report.extend(check_workspace_output(out, root, object_path, ignored))
            if cache and not all_cache:
                report.extend(check_cache_output(out, object_path, root))
        if cache and all_cache:
            report.extend(check_all_objects(odbs["md5"], "md5"))
        return report
    finally:
        repo.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.verify", description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", action="store_true", help="check only the workspace outputs")
    parser.add_argument("--cache", action="store_true", help="check only the cache objects")
    parser.add_argument("--all-cache", action="store_true", help="re-hash every object in the cache")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    args = parser.parse_args(argv)
    both = not args.workspace and not args.cache

    def go() -> None:
        report = verify(
            args.root,
            workspace=args.workspace or both,
            cache=args.cache or both or args.all_cache,
            all_cache=args.all_cache,
        )
        for line in report.notes + report.problems:
            print(line)
        summary = (
            f"verify: {report.files_checked} workspace files and {report.objects_checked} cache objects "
            f"re-hashed; {len(report.problems)} problem(s)"
        )
        if report.problems:
            print(
                summary
                + ". Fix: a bad workspace file -> `dvc checkout --force <path>` (restores it from the "
                "cache); a bad cache object -> delete it, then `dvc commit -f <stage>` if the workspace copy is "
                "good, or `dvc pull` / `dvc repro -f <stage>`; a lost one -> `dvc commit -f <stage>` or `dvc pull`.",
                file=sys.stderr,
            )
            sys.exit(1)
        print(summary)

    run_main(go)


if __name__ == "__main__":
    main()
