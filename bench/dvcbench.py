"""DVC wall times: a no-op `dvc status` / `dvc repro`, and (opt-in) the small profile's whole `dvc repro`.

Everything runs in a temporary copy of the repo, never in the checkout itself, so the benchmark can neither
run a stage in a shared working tree nor take its DVC lock:
- no-op: the checkout's working tree, dvc.lock and the outputs it records are copied (when they are under
  MAX_COPY_BYTES), `dvc commit` fills the copy's cache (refused if that would change dvc.lock), then
  `dvc status` and `dvc repro` are timed there: the first call, and the median of the following calls (the
  usual case). If the copy is not up to date (the checkout was not reproduced), `dvc repro` is not timed:
  it would run stages.
- full (`--full-repro`): the working tree without any output is copied and `dvc repro` of the whole
  pipeline is timed; the no-op figures are then taken in that copy.
MLflow runs of the copy go to a SQLite store inside it, whatever MLFLOW_TRACKING_URI says.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPEATS = 3  # warm no-op calls whose median is reported
MAX_COPY_BYTES = (
    2 << 30
)  # outputs larger than this (a 7B recipe's models) are not copied for the no-op figures


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
    )
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None = None
) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return time.perf_counter() - started, proc.returncode, proc.stdout + proc.stderr


def lock_outputs(repo: Path) -> list[str]:
    """The output paths recorded in dvc.lock (empty when there is no lock file)."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return []
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    outs = []
    for stage in (data.get("stages") or {}).values():
        outs += [o["path"] for o in stage.get("outs", []) if "path" in o]
    return outs


def source_files(repo: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore: the working tree as it is."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=repo, capture_output=True, check=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p and (repo / p).is_file()]


def copy_repo(repo: Path, dest: Path, with_outputs: bool) -> None:
    """Copy the working tree (and, optionally, dvc.lock and its outputs) into a fresh git repo at `dest`."""
    dest.mkdir(parents=True)
    paths = source_files(repo)
    if with_outputs:
        paths += ["dvc.lock"] if (repo / "dvc.lock").is_file() else []
        paths += lock_outputs(repo)
    else:
        paths = [p for p in paths if p != "dvc.lock"]
    for rel in dict.fromkeys(paths):
        src, dst = repo / rel, dest / rel
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    for name in ("config",):  # .dvc/config is tracked, but be sure the copy is a DVC project
        src = repo / ".dvc" / name
        if src.is_file() and not (dest / ".dvc" / name).exists():
            (dest / ".dvc").mkdir(exist_ok=True)
            shutil.copy2(src, dest / ".dvc" / name)
    env = _env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "bench copy"]):
        subprocess.run(cmd, cwd=dest, env=env, capture_output=True, check=True)


def up_to_date(root: Path, env: dict[str, str]) -> tuple[bool, str]:
    seconds, rc, output = _run(["dvc", "status", "--json"], root, env)
    if rc != 0:
        return False, f"dvc status failed: {output.strip()[-300:]}"
    try:
        status = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    except ValueError:
        return False, f"dvc status --json printed {output.strip()[-200:]!r}"
    return (not status), ("" if not status else f"not up to date: {', '.join(sorted(status))}")


def noop_timings(root: Path) -> dict[str, Any]:
    """Cold and warm (median of REPEATS) wall times of `dvc status` and a no-op `dvc repro` in `root`."""
    env = _env(root)
    started = time.perf_counter()
    clean, why = up_to_date(root, env)
    if not clean:
        return {"error": why}
    result: dict[str, Any] = {"dvc_status_cold_s": time.perf_counter() - started}
    result["dvc_status_s"] = statistics.median(_run(["dvc", "status"], root, env)[0] for _ in range(REPEATS))
    times = []
    for _ in range(REPEATS):
        seconds, rc, output = _run(["dvc", "repro"], root, env)
        if rc != 0:
            return result | {"error": f"dvc repro failed: {output.strip()[-300:]}"}
        if "didn't change, skipping" not in output and "up to date" not in output.lower():
            return result | {"error": f"dvc repro did work: {output.strip()[-300:]}"}
        times.append(seconds)
    result["dvc_repro_noop_s"] = statistics.median(times)
    return result


def measure(repo: Path, work: Path, full_repro: bool, log=print) -> dict[str, Any]:
    """No-op figures (and the whole repro with `full_repro`); an 'error' entry says what was not measured."""
    if full_repro:
        root = work / "dvc-full"
        copy_repo(repo, root, with_outputs=False)
        log("  dvc: full `dvc repro` of the small profile in a copy of the repo (minutes) ...")
        seconds, rc, output = _run(["dvc", "repro"], root, _env(root))
        if rc != 0:
            return {"error": f"dvc repro failed in {root}: {output.strip()[-500:]}"}
        log(f"  dvc: full repro {seconds:.0f} s")
        return {"dvc_full_repro_s": seconds} | noop_timings(root)
    if not (repo / "dvc.lock").is_file():
        return {"error": "no dvc.lock in the checkout (run `dvc repro` first, or pass --full-repro)"}
    size = sum(_size(repo / p) for p in lock_outputs(repo))
    if size > MAX_COPY_BYTES:
        return {
            "error": f"the checkout's outputs are {size / 2**30:.1f} GiB: too big to copy for the no-op figures"
        }
    root = work / "dvc-noop"
    copy_repo(repo, root, with_outputs=True)
    # The copy has the outputs but an empty DVC cache, which `dvc status` reports as "not in cache": fill it.
    # `dvc commit` would also rewrite dvc.lock if an output differed from it, so the lock must stay the same.
    lock = (root / "dvc.lock").read_bytes()
    _seconds, rc, output = _run(["dvc", "commit", "--force", "--quiet"], root, _env(root))
    if rc != 0:
        return {"error": f"dvc commit in the copy failed: {output.strip()[-300:]}"}
    if (root / "dvc.lock").read_bytes() != lock:
        return {
            "error": "the checkout's outputs differ from its dvc.lock (run `dvc repro` in the checkout first)"
        }
    result = noop_timings(root)
    if "error" in result:
        result["error"] += " (run `dvc repro` in the checkout first, or pass --full-repro)"
    return result


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
