"""Issues 5.4 and 6.5: a real `mlflow server`. A stage records its run, lineage tags and metrics there;
`tools.compare` diffs two commits from it; an unreachable server stops a stage before any work; a server
that dies mid-training costs no adapter; SIGTERM ends the run KILLED, never RUNNING."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from dpo_pipeline.io import sha256_tree
from tests.e2e.conftest import Project, free_port

pytestmark = pytest.mark.slow


def with_tracking(project: Project, uri: str) -> Project:
    return Project(project.root, dict(project.env, MLFLOW_TRACKING_URI=uri))


def client_for(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(url)


def experiment_id(client, project: Project) -> str:
    name = project.params()["tracking"]["experiment"]
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the server"
    return experiment.experiment_id


def stage_runs(client, exp_id: str, stage: str, extra: str = "") -> list:
    query = f"tags.stage = '{stage}'" + (f" and {extra}" if extra else "")
    return client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"])


def lock_md5(project: Project, path: str) -> str:
    import yaml

    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if entry["path"] == path:
                return entry["md5"]
    raise AssertionError(f"{path} not in dvc.lock")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """md5 and mtime of every file under root (to prove outputs were not touched)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def test_stage_records_run_lineage_and_metrics_on_server(clone, mlflow_server):
    project = with_tracking(clone("lineage"), mlflow_server.url)
    out = project.dvc("repro", "-f", "-s", "prepare").stdout
    assert "Running stage 'prepare'" in out
    # prepare is deterministic: the forced re-run reproduces dvc.lock's hashes exactly
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."

    client = client_for(mlflow_server.url)
    exp_id = experiment_id(client, project)
    head = project.head()
    runs = stage_runs(client, exp_id, "prepare", f"tags.`git.commit` = '{head}'")
    assert len(runs) == 1
    run = runs[0]
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert tags["git.branch"] == "main" and tags["git.dirty"] == "false"
    # lineage: an input another stage produced by DVC's md5 from dvc.lock (never hashed again); the raw
    # file, git-tracked and no stage's output, by our sha256; outputs by path (dvc.lock holds their md5)
    assert tags["input.base.hash"] == "md5:" + lock_md5(project, "models/base")
    from dpo_pipeline.io import sha256_file

    assert tags["input.raw.hash"] == "sha256:" + sha256_file(project.root / "data/raw/orca_dpo_sample.jsonl")
    assert tags["output.prepared.path"] == "data/prepared"
    assert not [k for k in tags if k.endswith(".sha256") or k.endswith(".md5")]
    for lib in ("torch", "transformers", "dvc", "mlflow"):
        assert tags[f"version.{lib}"] == metadata.version(lib)
    # metrics and params as the stage wrote / read them
    data = project.read_json("metrics/data.json")
    for key in ("rows_in", "rows_out", "rows_train", "rows_test"):
        assert metrics[key] == data[key]
    assert float(params["data.test_fraction"]) == project.params()["data"]["test_fraction"]
    # exactly the params prepare declares in dvc.yaml: not the seed, not the length limits (tokenize's)
    assert "seed" not in params and "data.max_length" not in params
    # the params artifact went through the server's artifact proxy
    assert "params.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "params.json", str(project.root.parent))
    assert (
        json.loads(Path(local).read_text())["data.test_fraction"] == project.params()["data"]["test_fraction"]
    )


def test_compare_two_commits_from_server(clone, mlflow_server):
    project = with_tracking(clone("compare"), mlflow_server.url)
    project.dvc("repro", "-f", "-s", "prepare")
    sha_main = project.head()
    rows_main = project.read_json("metrics/data.json")["rows_test"]

    # the documented flow: commit the params change, dvc repro, commit the lock
    project.git("checkout", "-q", "-b", "frac")
    project.set_params({"data.test_fraction": 0.3})
    project.commit("data.test_fraction 0.3")
    sha_params = project.head()
    project.dvc("repro", "-s", "prepare")
    project.commit("dvc repro")
    rows_frac = project.read_json("metrics/data.json")["rows_test"]
    assert rows_frac > rows_main

    out = project.python("-m", "tools.compare", "main", "frac", "--stage", "prepare").stdout
    assert f"A = main ({sha_main})" in out
    assert f"using the runs of its ancestor {sha_params}" in out
    line = next(row for row in out.splitlines() if row.startswith("rows_test "))
    assert line.split() == ["rows_test", str(rows_main), str(rows_frac), f"+{rows_frac - rows_main}"]
    assert re.search(r"^test_fraction|^rows_in\s+(\d+)\s+\1\s+0$", out, re.MULTILINE)

    # another machine: a clone that never saw the `frac` commits compares them by full sha
    other = with_tracking(clone("other-machine", checkout=False), mlflow_server.url)
    assert other.git("cat-file", "-e", sha_params, check=False).returncode != 0
    out = other.python("-m", "tools.compare", sha_main, sha_params, "--stage", "prepare").stdout
    assert re.search(rf"^rows_test\s+{rows_main}\s+{rows_frac}\s", out, re.MULTILINE)
    # and an unknown rev is one clear error
    bad = other.python("-m", "tools.compare", "main", "no-such-branch", check=False)
    assert bad.returncode == 1 and "cannot resolve 'no-such-branch'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_unreachable_server_stops_stage_before_work(clone):
    project = clone("unreachable")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = Project(project.root, dict(project.env, MLFLOW_TRACKING_URI=url))
    before = {rel: snapshot(project.root / rel) for rel in ("data/prepared", "metrics/data.json")}
    started = time.monotonic()
    result = down.python("-m", "stages.prepare", check=False)
    assert result.returncode == 1
    assert f"error: MLflow tracking server {url} (MLFLOW_TRACKING_URI) is unreachable" in result.stderr
    assert "nothing was run" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120
    for rel, snap in before.items():
        assert snapshot(project.root / rel) == snap, f"{rel} was touched"

    # Under dvc repro the stage fails the same way. DVC itself removed the stage's outputs before running
    # it (its normal behaviour for non-persistent outs); the last committed state comes back with git (the
    # `cache: false` metrics) and `dvc checkout` (the cached outputs).
    repro = down.dvc("repro", "-f", "-s", "prepare", check=False)
    assert repro.returncode != 0
    assert "is unreachable" in repro.stdout + repro.stderr
    assert not (project.root / "data/prepared").exists() and not (project.root / "metrics/data.json").exists()
    project.git("checkout", "--", "metrics")
    project.dvc("checkout", "-q")
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."

    # `tracking.on_unreachable: local` falls back to ./mlflow.db; the tracking section is no DVC param
    project.set_params({"tracking.on_unreachable": "local"})
    # only validate (which re-checks params.yaml in a second) is stale: no stage declares `tracking`
    status = project.dvc("status").stdout
    assert re.findall(r"^([\w-]+):\s*$", status, re.MULTILINE) == ["validate"], status
    result = down.python("-m", "stages.prepare")
    assert "is unreachable" in result.stderr and "local store" in result.stderr
    assert (project.root / "mlflow.db").exists()
    assert project.git("status", "--porcelain", "mlflow.db").stdout == ""  # gitignored


def _start_train(project: Project, tmp_path: Path):
    log = tmp_path / "train.log"
    proc = project.popen(sys.executable, "-m", "stages.train", log=log)
    return proc, log


def test_server_killed_mid_training_keeps_the_adapter(clone, mlflow_server, tmp_path):
    project = with_tracking(clone("server-dies"), mlflow_server.url)
    # Long enough that training is still running when the server dies (the tiny profile's few steps take
    # ~2 s on quiet cores: the kill landed after the last logging call and nothing had to fail).
    project.set_params({"train.max_steps": 300, "train.save_steps": 300, "train.eval_steps": 100})
    adapter = project.root / "models" / "adapter"
    old = snapshot(adapter)
    client = client_for(mlflow_server.url)
    proc, log = _start_train(project, tmp_path)
    try:
        exp_id = wait_for(lambda: _experiment(client, project), 300, "the experiment", proc)

        def logging_started():
            runs = stage_runs(client, exp_id, "train", f"tags.pid = '{proc.pid}'")
            return runs and runs[0].info.status == "RUNNING" and "loss" in runs[0].data.metrics and runs[0]

        run = wait_for(logging_started, 300, "the train run to log its first step", proc)
        mlflow_server.stop(signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "warning: MLflow tracking failed" in text
    assert text.count("warning: MLflow tracking failed") == 1  # reported once, then logging is skipped
    # the adapter was published
    new = snapshot(adapter)
    assert new and new != old
    weights = next(p for p in adapter.iterdir() if p.suffix == ".safetensors")
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        assert any("lora" in key for key in handle.keys())
    assert project.read_json("metrics/train.json")["train_steps"] == project.params()["train"]["max_steps"]

    # The server comes back on the same database: the run could not be closed while it was down, so it is
    # still RUNNING; the next run of the stage on this host closes it as KILLED (its process is gone).
    mlflow_server.start()
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    from dpo_pipeline.tracking import close_stale_runs

    assert close_stale_runs(client, exp_id, "train") == [run.info.run_id]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not stage_runs(client, exp_id, "train", "attributes.status = 'RUNNING'")


def test_sigterm_ends_the_run_killed(clone, mlflow_server, tmp_path):
    project = with_tracking(clone("sigterm"), mlflow_server.url)
    # Long enough that the SIGTERM lands inside the training loop: the tiny profile's few steps take ~2 s,
    # less than it takes to see the first logged step on the server and send the signal.
    project.set_params({"train.max_steps": 2000, "train.save_steps": 2000, "train.eval_steps": 1000})
    adapter = project.root / "models" / "adapter"
    old = snapshot(adapter)
    client = client_for(mlflow_server.url)
    proc, log = _start_train(project, tmp_path)
    try:
        exp_id = wait_for(lambda: _experiment(client, project), 300, "the experiment", proc)

        def training():  # this process's run (tags.pid), inside the training loop (a step was logged)
            runs = stage_runs(client, exp_id, "train", f"tags.pid = '{proc.pid}'")
            return runs and "loss" in runs[0].data.metrics and runs[0]

        run = wait_for(training, 300, "the train run to log its first step", proc)
        assert run.info.status == "RUNNING"
        os.kill(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not stage_runs(client, exp_id, "train", "attributes.status = 'RUNNING'")
    # the previous adapter is untouched and no temporary sibling is left behind
    assert snapshot(adapter) == old
    assert not list(adapter.parent.glob(".adapter.tmp-*"))


def _experiment(client, project: Project) -> str | None:
    experiment = client.get_experiment_by_name(project.params()["tracking"]["experiment"])
    return experiment.experiment_id if experiment else None


def test_the_merged_model_is_an_mlflow_model_linked_to_its_runs_and_dvc(clone, mlflow_server):
    """Issue 17, point 4: the report stage records models/merged as an MLflow logged model (registered too):
    its metrics, its source (the merge run), the train and evaluate runs, and where DVC keeps the weights."""
    project = with_tracking(clone("model"), mlflow_server.url)
    for stage in ("train", "merge", "evaluate", "report"):
        assert f"Running stage '{stage}'" in project.dvc("repro", "-f", "-s", stage).stdout
    client = client_for(mlflow_server.url)
    exp_id = experiment_id(client, project)
    scores = project.read_json("metrics/eval.json")
    name = project.params()["tracking"]["experiment"] + "-merged"

    model = client.get_logged_model(project.read_json("metrics/report_run.json")["mlflow_model_id"])
    assert model.name == name
    head = f"tags.`git.commit` = '{project.head()}'"
    merge_run, evaluate_run, report_run = (
        stage_runs(client, exp_id, s, head)[0] for s in ("merge", "evaluate", "report")
    )
    assert model.source_run_id == merge_run.info.run_id
    tags = model.tags
    assert tags["dvc.path"] == "models/merged" and tags["dvc.md5"] == lock_md5(project, "models/merged")
    assert tags["git.commit"] == project.head()
    # the train run is found by the adapter's content hash (no run id is written into any file)
    train_run = client.get_run(tags["lineage.train_run_id"])
    assert train_run.info.experiment_id == exp_id and train_run.info.status == "FINISHED"
    assert train_run.data.tags["stage"] == "train"
    assert train_run.data.tags["output.adapter.sha256"] == sha256_tree(project.root / "models/adapter")
    assert tags["lineage.evaluate_run_id"] == evaluate_run.info.run_id
    assert tags["lineage.report_run_id"] == report_run.info.run_id
    assert tags["lineage.adapter.hash"] == merge_run.data.tags["lineage.adapter.hash"]
    metrics = {m.key: m.value for m in model.metrics}
    for key in ("dpo_heldout_pref/acc_norm", "dpo_heldout_pref/acc_norm_delta", "average_delta_stderr"):
        assert metrics[key] == pytest.approx(scores[key]), key
    assert report_run.data.tags["model.id"] == model.model_id
    # listed by experiment, and as a version in the registry
    listed = client.search_logged_models([exp_id], filter_string=f"name = '{name}'")
    assert model.model_id in {m.model_id for m in listed}
    versions = client.search_model_versions(f"name = '{name}'")
    assert f"models:/{model.model_id}" in {v.source for v in versions}
    assert report_run.data.tags["model.registered"] in {f"{name}/{v.version}" for v in versions}


def test_make_mlflow_server_shows_the_runs_dvc_repro_recorded(tmp_path):
    """Issue 27, point 2: the Makefile's server command (as `make -n` prints it for a work tree) serves the store
    the stages write by default, so a run recorded without any server is listed by the server."""
    import subprocess

    from mlflow.tracking import MlflowClient

    from tests.e2e.conftest import REPO, kill_group

    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = store.create_experiment("dpo-pipeline", artifact_location=str(tmp_path / "mlruns" / "1"))
    recorded = store.create_run(exp_id, tags={"stage": "prepare"}).info.run_id
    store.set_terminated(recorded)
    port = free_port()
    command = subprocess.run(
        ["make", "-n", "-s", "-o", "setup", "mlflow-server", f"CURDIR={tmp_path}", f"MLFLOW_PORT={port}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        ["bash", "-c", command],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client, deadline = MlflowClient(f"http://127.0.0.1:{port}"), time.time() + 90
        while True:
            try:
                experiment = client.get_experiment_by_name("dpo-pipeline")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.run_id for r in runs] == [recorded]
    finally:
        kill_group(server)
