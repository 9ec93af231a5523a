"""Issue 6: two `dvc repro` at once, integrity checks with tools.verify, and kill -9 anywhere."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DIR_OUTS, DVC, Project, kill_group

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date."
# DVC's two lock errors: the repo lock (held while DVC reads/writes dvc.lock and the graph) and the per-output
# read/write locks (held while a stage command runs; DVC releases the repo lock during the command).
REPO_LOCK_MESSAGE = (
    "Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly."
)
RWLOCK_MESSAGE = re.compile(
    r"ERROR: failed to reproduce '[\w-]+': '.+' is busy, it is being blocked by:\n\s+\(PID \d+\): .*dvc repro"
)


def flip_byte(path: Path, offset: int | None = None, keep_stat: bool = False) -> None:
    """Flip one bit; with keep_stat, restore mode and mtime afterwards, as silent bit rot would leave them."""
    stat = path.stat()
    path.chmod(0o644)  # DVC makes cache objects read-only
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_stat:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        path.chmod(stat.st_mode & 0o777)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_object(project: Project, path: Path) -> Path:
    digest = md5(path)
    return project.cache_dir / "files" / "md5" / digest[:2] / digest[2:]


def test_two_repros_at_once_one_fails_fast_nothing_corrupted(clone, tmp_path):
    project = clone("concurrent")
    project.set_params({"eval.max_new_tokens": 4})  # evaluate_base + evaluate re-run: long enough to overlap
    started = time.monotonic()
    procs = [project.popen(DVC, "repro", log=tmp_path / f"repro-{i}.log") for i in (0, 1)]
    try:
        finished = {}
        while len(finished) < 2 and time.monotonic() - started < 900:
            for index, proc in enumerate(procs):
                if index not in finished and proc.poll() is not None:
                    finished[index] = (proc.returncode, time.monotonic() - started)
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_group(proc)
    logs = [(tmp_path / f"repro-{i}.log").read_text() for i in (0, 1)]
    codes = sorted(code for code, _ in finished.values())
    assert codes[0] == 0 and codes[1] != 0, logs
    loser = next(i for i, (code, _) in finished.items() if code != 0)
    winner = 1 - loser
    assert REPO_LOCK_MESSAGE in logs[loser] or RWLOCK_MESSAGE.search(logs[loser]), logs[loser]
    assert "Running stage" not in logs[loser]
    assert finished[loser][1] < finished[winner][1]  # it failed fast, it did not wait for the other
    assert "Running stage 'evaluate'" in logs[winner]
    # the winner's results are complete and consistent
    assert project.dvc("status").stdout.strip() == UP_TO_DATE
    assert project.python("-m", "tools.verify").returncode == 0
    assert "max_new_tokens: 4" in (project.root / "dvc.lock").read_text()


def test_verify_names_corrupted_workspace_and_cache_files(clone):
    project = clone("verify")
    clean = project.python("-m", "tools.verify")
    assert clean.stdout.strip().endswith("0 problem(s)"), clean.stdout

    # 1. a workspace output: one byte of the merged model's weights
    weights = next(
        p for p in sorted((project.root / "models/merged").iterdir()) if p.suffix == ".safetensors"
    )
    flip_byte(weights)
    bad = project.python("-m", "tools.verify", check=False)
    assert bad.returncode == 1
    problems = [line for line in bad.stdout.splitlines() if not line.startswith("absent")]
    assert len(problems) == 1 and problems[0].startswith(f"MISMATCH   models/merged/{weights.name}: md5"), (
        bad.stdout
    )
    assert "dvc checkout --force" in bad.stderr
    project.dvc("checkout", "--force", "models/merged")
    assert project.python("-m", "tools.verify").returncode == 0

    # 2. a cache object: one byte of the cached train.parquet. DVC does not notice ...
    parquet = project.root / "data/prepared/train.parquet"
    obj = cache_object(project, parquet)
    flip_byte(obj, keep_stat=True)
    assert project.dvc("status").stdout.strip() == UP_TO_DATE
    # ... tools.verify does, and names the object and the output file it stands for
    bad = project.python("-m", "tools.verify", check=False)
    assert bad.returncode == 1
    assert f"CORRUPT    cache object {obj} (data/prepared/train.parquet, stage prepare)" in bad.stdout
    # ... and a checkout from the bad cache spreads it silently, which verify catches in the workspace too
    shutil.rmtree(project.root / "data/prepared")
    project.dvc("checkout", "data/prepared")
    assert project.dvc("status").stdout.strip() == UP_TO_DATE
    bad = project.python("-m", "tools.verify", check=False)
    assert "MISMATCH   data/prepared/train.parquet: md5" in bad.stdout
    # only the cache or only the workspace
    assert "CORRUPT" not in project.python("-m", "tools.verify", "--workspace", check=False).stdout
    assert "MISMATCH" not in project.python("-m", "tools.verify", "--cache", check=False).stdout

    # 3. a lost cache object (issue 24): `dvc status` says "not in cache"; verify counts it, with the repair
    obj = cache_object(project, project.root / "data/prepared/test.parquet")
    obj.unlink()
    assert "not in cache" in project.dvc("status").stdout
    lost = project.python("-m", "tools.verify", "--cache", check=False)
    assert lost.returncode == 1
    line = next(x for x in lost.stdout.splitlines() if x.startswith("LOST"))
    assert "data/prepared/test.parquet, stage prepare" in line and "dvc commit -f prepare" in line


# ---------------------------------------------------------------------------------------------------------
# kill -9 anywhere


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def stage_process(proc: subprocess.Popen, needle: str):
    """The child process of `dvc repro` whose command line ends with `needle` ("stages.<stage> [args]"), or None:
    the end, so "stages.evaluate evaluate" is not also "stages.evaluate evaluate_base"."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if " ".join(child.cmdline()).endswith(needle):
                return child
        except psutil.Error:
            continue
    return None


class Watcher:
    """Polls the out paths while the pipeline runs: an out present must be a complete one (same files and
    sizes as in the uninterrupted reference run); a half-written output at an out's path is a failure."""

    def __init__(self, project: Project, reference: Path):
        self.project = project
        self.expected = {rel: listing(reference / rel) for rel in DIR_OUTS}
        self.size_stable = {
            rel: {f for f in files if f.endswith((".safetensors", ".parquet"))}
            for rel, files in self.expected.items()
        }
        self.samples = 0

    def check(self) -> None:
        self.samples += 1
        for rel in DIR_OUTS:
            path = self.project.root / rel
            try:
                seen = listing(path) if path.exists() else None
            except FileNotFoundError:
                continue  # renamed away between listing steps: an atomic swap in progress
            if seen is None:
                continue
            expected = self.expected[rel]
            assert set(seen) == set(expected), (
                f"{rel} visible with files {sorted(seen)}, expected {sorted(expected)}"
            )
            for name in self.size_stable[rel]:
                assert seen[name] == expected[name], (
                    f"{rel}/{name} visible at {seen[name]} of {expected[name]} bytes"
                )


def run_until_killed(
    project: Project, watcher: Watcher, log: Path, stage: str, trigger, timeout: float = 600
) -> str:
    """Start `dvc repro`, SIGKILL its whole process group when trigger(proc) is true while `stage` runs."""
    proc = project.popen(DVC, "repro", log=log)
    deadline = time.monotonic() + timeout
    stage_seen_at = None
    try:
        while time.monotonic() < deadline:
            watcher.check()
            if proc.poll() is not None:
                raise AssertionError(
                    f"dvc repro ended ({proc.returncode}) before the kill during {stage}:\n{log.read_text()[-3000:]}"
                )
            child = stage_process(proc, f"stages.{stage}")
            if child is not None:
                stage_seen_at = stage_seen_at or time.monotonic()
                if trigger(time.monotonic() - stage_seen_at):
                    kill_group(proc)
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no kill point reached during {stage} in {timeout} s")
    finally:
        if proc.poll() is None:
            kill_group(proc)
    watcher.check()
    return log.read_text()


def stage_run_open(project: Project, stage: str) -> bool:
    """The stage has opened its MLflow run (past its imports, into its work): read from the SQLite store."""
    import sqlite3

    db = project.env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute(
                "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'stage' and t.value = ? and r.status = 'RUNNING'",
                (stage,),
            ).fetchone()
    except sqlite3.Error:
        return False
    return bool(rows and rows[0])


def running_runs(project: Project) -> list[tuple[str, str]]:
    import sqlite3

    db = project.env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "select r.run_uuid, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'stage' and r.status = 'RUNNING'"
        ).fetchall()


def tmp_sibling(project: Project, rel: str) -> bool:
    path = project.root / rel
    return any(path.parent.glob(f".{path.name}.tmp-*"))


def assert_close_safetensors(a: Path, b: Path) -> bool:
    """True when byte-identical; otherwise every tensor must be allclose (asserted)."""
    if a.read_bytes() == b.read_bytes():
        return True
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    import torch

    for key in ta:
        assert torch.allclose(ta[key].float(), tb[key].float(), rtol=1e-4, atol=1e-5), key
    return False


def keep_only_in_cache(project: Project, out: str) -> None:
    """Drop every cache object but those of one directory output, and the run-cache."""
    import json

    import yaml

    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    oid = next(o["md5"] for st in lock["stages"].values() for o in st.get("outs", []) if o["path"] == out)
    objects = project.cache_dir / "files" / "md5"
    manifest = json.loads((objects / oid[:2] / oid[2:]).read_text())
    keep = {oid} | {entry["md5"] for entry in manifest}
    for path in list(objects.rglob("*")):
        if path.is_file() and path.parent.name + path.name not in keep:
            path.unlink()
    shutil.rmtree(project.cache_dir / "runs", ignore_errors=True)


def test_kill_anywhere_then_repro_completes(clone, tiny_project, tmp_path):
    # A clone whose cache holds only the base model: every later stage must really run (a stage whose
    # dvc.lock entry matches and whose outputs are in the cache would just be checked out).
    project = clone("kill", checkout=False)
    keep_only_in_cache(project, "models/base")
    project.dvc("checkout", "-q", "models/base")
    # evaluate's outputs are git-tracked (cache: false) and its inputs come out byte-identical to the
    # locked ones, so DVC would rightly skip it: without them it must run, and can be killed.
    for rel in ("metrics/eval_merged.json", "metrics/eval_merged_docs.json", "metrics/samples.json"):
        (project.root / rel).unlink()
    reference = tiny_project.root
    watcher = Watcher(project, reference)
    logs = {}

    def inside(stage: str, delay: float, out: str | None = None):
        """Kill when the stage's temporary output appears, or `delay` s after it opened its MLflow run
        (i.e. past its imports, inside its work)."""
        opened: list[float] = []

        def trigger(age: float) -> bool:
            if out and tmp_sibling(project, out):
                return True
            if not opened and stage_run_open(project, stage):
                opened.append(time.monotonic())
            return bool(opened) and time.monotonic() - opened[0] >= delay

        return trigger

    # 1. during prepare
    logs["prepare"] = run_until_killed(
        project, watcher, tmp_path / "1.log", "prepare", inside("prepare", 0.5, "data/prepared")
    )
    assert not (project.root / "data/prepared").exists()

    # 2. during training, between checkpoints: once a complete checkpoint exists
    def checkpoint_done(age: float) -> bool:
        return any((project.root / ".scratch").glob("checkpoints/train/*/checkpoint-*/trainer_state.json"))

    logs["train"] = run_until_killed(project, watcher, tmp_path / "2.log", "train", checkpoint_done)
    assert (project.root / "data/prepared").exists()  # completed in this run
    assert not (project.root / "models/adapter").exists()

    # 3. during merge
    logs["merge"] = run_until_killed(
        project, watcher, tmp_path / "3.log", "merge", inside("merge", 1.0, "models/merged")
    )
    assert "train: resuming from" in logs["merge"], "train did not resume from its checkpoint"
    assert not (project.root / "models/merged").exists()

    # 4. during evaluate (the tuned model's scoring)
    logs["evaluate"] = run_until_killed(
        project, watcher, tmp_path / "4.log", "evaluate evaluate", inside("evaluate", 2.0)
    )

    # 5. the next dvc repro completes and the result equals the uninterrupted run
    proc = project.popen(DVC, "repro", log=tmp_path / "5.log")
    while proc.poll() is None:
        watcher.check()
        time.sleep(0.05)
    assert proc.returncode == 0, (tmp_path / "5.log").read_text()[-3000:]
    assert project.dvc("status").stdout.strip() == UP_TO_DATE
    assert project.python("-m", "tools.verify").returncode == 0
    # every run a SIGKILL left RUNNING was closed by the next run of its stage
    assert running_runs(project) == []

    for rel in ("data/prepared", "data/tokenized", "data/reference", "models/base"):
        for name in listing(reference / rel):
            assert (project.root / rel / name).read_bytes() == (reference / rel / name).read_bytes(), (
                f"{rel}/{name}"
            )
    exact = {}
    for rel in ("models/adapter", "models/merged"):
        for name in listing(reference / rel):
            if name.endswith(".safetensors"):
                exact[f"{rel}/{name}"] = assert_close_safetensors(
                    project.root / rel / name, reference / rel / name
                )
    print(
        f"\n[e2e] kill-anywhere: {watcher.samples} samples of the out paths; bit-exact after resume: {exact}"
    )
    leftovers = sorted(str(p.relative_to(project.root)) for p in project.root.glob("**/.*.tmp-*"))
    # Every killed stage ran again, and a writer removes its dead predecessors' temp siblings first.
    assert leftovers == [], f"temporary siblings left behind by killed writers: {leftovers}"


class _NoWatch:
    """run_until_killed's watcher for a run whose outputs have no reference listing."""

    samples = 0

    def check(self) -> None:
        self.samples += 1


def train_processes(project: Project) -> list:
    """Every live process running this project's train stage (launcher, torchrun agent or worker)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["cwd"] != str(project.root):
                continue
            if "stages.train" in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_killing_a_multi_process_train_leaves_no_worker_and_resumes(clone, tmp_path):
    """Issue 24: torchrun starts each worker in a session of its own, so a kill -9 of the `dvc repro`
    process group used to leave both workers training; they then published models/adapter and the metrics
    outside dvc repro and deleted the checkpoints. Workers now die with their launcher."""
    project = clone("kill-mp")
    project.set_params({"train.num_processes": 2})
    project.dvc("repro", "pairs")  # the global batch moved with the process count: pairs first, not killed
    project.commit("two processes")
    adapter = project.root / "models/adapter"
    shutil.rmtree(adapter)
    metrics = (project.root / "metrics/train.json").read_bytes()

    def checkpoint_done(age: float) -> bool:
        return any((project.root / ".scratch").glob("checkpoints/train/*/checkpoint-*/trainer_state.json"))

    log = run_until_killed(project, _NoWatch(), tmp_path / "1.log", "train", checkpoint_done)
    assert "launching 2 processes" in log
    deadline = time.monotonic() + 15
    while train_processes(project) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert train_processes(project) == [], "a train worker outlived its launcher"
    time.sleep(2)  # nothing may publish afterwards either
    assert not adapter.exists()
    train_json = project.root / "metrics/train.json"  # dvc repro removed it before the stage ran
    assert not train_json.exists() or train_json.read_bytes() == metrics
    assert any((project.root / ".scratch").glob("checkpoints/train/*/checkpoint-*")), "checkpoints deleted"

    proc = project.popen(DVC, "repro", "train", log=tmp_path / "2.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "2.log").read_text()[-3000:]
    assert "train: resuming from" in (tmp_path / "2.log").read_text()
    assert adapter.exists() and train_processes(project) == []
    assert [s for _run, s in running_runs(project)] == []
