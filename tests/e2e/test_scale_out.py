"""Issue 28 end to end, against the suite's real OpenSSH server: a second "node" (its own clone and DVC
workspace) gets train's inputs from the SSH DVC remote through `tools/train_worker.py` and trains one adapter
with node 0's `dvc repro`; the SkyPilot tasks' `run:` script, executed in a fresh clone of an SSH git remote,
pushes an experiment that another clone `dvc exp pull`s and `dvc exp show`s."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.conftest import Project, free_port, project_env
from tests.e2e.test_remote_storage import add_ssh_remote

pytestmark = pytest.mark.slow


def ssh_config(env: dict[str, str], sshd: dict) -> str:
    """The suite's throwaway key for the SSH server, as a user's ~/.ssh/config gives it: DVC's git client
    (dulwich over asyncssh, which reads $HOME/.ssh/config and checks no host key) reads it as it is. Returns the
    `core.sshCommand` the git CLI needs for it (OpenSSH reads the passwd home's config, not $HOME's)."""
    ssh_dir = Path(env["HOME"]) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    config = ssh_dir / "config"
    config.write_text(
        f"Host {sshd['host']}\n  IdentityFile {sshd['keyfile']}\n  IdentitiesOnly yes\n"
        "  UserKnownHostsFile /dev/null\n"
    )
    return f"core.sshCommand=ssh -F {config} -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR"


def dvc_url(sshd: dict, store: Path) -> str:
    return f"ssh://{sshd['user']}@{sshd['host']}:{sshd['port']}{store}"


def test_a_second_node_pulls_its_inputs_and_trains_with_node_0(clone, sshd, tmp_path):
    node0 = clone("node0")
    add_ssh_remote(node0, dvc_url(sshd, tmp_path / "dvc-store"), sshd["keyfile"], commit=True)
    node0.set_params({"train.num_nodes": 2})
    node0.commit("train on two nodes")
    # Node 0 makes train's inputs (the pairs stage selects pairs for the new global batch) and shares them:
    # the outputs and the run-cache entries that let another workspace restore them without running.
    repro = node0.dvc("repro", "reference").stdout
    assert "Running stage 'pairs'" in repro and "Running stage 'reference'" in repro, repro
    node0.dvc("push", "--run-cache")

    # Node 1: a fresh clone of the same commit, nothing in its cache, the remote's key of its own.
    node1 = clone("node1", source=node0, cache=False, checkout=False)
    add_ssh_remote(node1, dvc_url(sshd, tmp_path / "dvc-store"), sshd["keyfile"], commit=False)
    port = str(free_port())
    place = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    worker_log = tmp_path / "worker.log"
    worker = node1.popen(
        sys.executable, "-m", "tools.train_worker",
        env=dict(node1.env, NODE_RANK="1", **place), log=worker_log,
    )  # fmt: skip
    try:
        head = Project(node0.root, dict(node0.env, NODE_RANK="0", **place)).dvc("repro", "train", timeout=600)
        assert worker.wait(timeout=120) == 0, worker_log.read_text()[-6000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    log = worker_log.read_text()
    # The costly inputs came from the remote: pulled (unchanged stages) or restored from node 0's run cache.
    # The cheap ones whose metrics live in git, not the cache (validate, pairs), may run again here, to the
    # same bytes.
    for stage in ("base", "prepare", "tokenize", "reference"):
        assert f"Running stage '{stage}'" not in log, log[-6000:]
    assert "Stage 'reference' is cached - skipping run, checking out outputs" in log, log[-6000:]
    for rel in ("data/pairs/selected.parquet", "data/reference/train.parquet", "models/base/config.json"):
        assert (node1.root / rel).read_bytes() == (node0.root / rel).read_bytes(), rel
    assert "--nnodes 2 --nproc_per_node 1 --node_rank 1 --master_addr 127.0.0.1" in log
    assert "train: node 0 of 2, launching 1 processes" in head.stdout + head.stderr
    assert (node0.root / "models" / "adapter").is_dir()
    assert not (node1.root / "models" / "adapter").exists()
    assert node0.dvc("status", "train").stdout.strip() == "Data and pipelines are up to date."


def test_the_cloud_run_script_round_trips_an_experiment(clone, sshd, tmp_path):
    """cloud/pipeline.sky.yaml's `run:` on a "VM": a fresh clone of the SSH git remote, no DVC cache, the
    remote's credentials given to it; its experiment reaches a teammate through `dvc exp pull`."""
    task = yaml.safe_load((REPO / "cloud" / "pipeline.sky.yaml").read_text())
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    git_url = f"ssh://{sshd['user']}@{sshd['host']}:{sshd['port']}{origin}"
    store_url = dvc_url(sshd, tmp_path / "dvc-store")

    producer = clone("producer")
    git_ssh = ssh_config(producer.env, sshd)
    add_ssh_remote(producer, store_url, sshd["keyfile"], commit=True)
    producer.dvc("push")
    producer.git("remote", "set-url", "origin", git_url)
    producer.git("-c", git_ssh, "push", "-q", "origin", "main")

    def fresh(name: str) -> Project:
        project = Project(tmp_path / name, project_env(tmp_path / f"{name}-env"))
        clone_ssh = ssh_config(project.env, sshd)
        subprocess.run(
            ["git", "-c", clone_ssh, "clone", "-q", git_url, str(project.root)],
            check=True,
            env=project.env,
            capture_output=True,
        )
        add_ssh_remote(project, store_url, sshd["keyfile"], commit=False)  # the secret: per machine
        return project

    vm = fresh("vm")
    # The edit re-runs only the report stage: it pulls just what report reads, nothing else.
    env = dict(vm.env, PARAMS="report.significance_level=0.1", EXP_NAME="cloud-exp")
    result = Project(vm.root, env).run("bash", "-c", task["run"], timeout=600)
    out = result.stdout + result.stderr
    assert "Running stage 'report'" in out, out[-6000:]
    for stage in ("train", "merge", "evaluate"):
        assert f"Running stage '{stage}'" not in out
    assert not (vm.root / "models" / "adapter").exists(), "a skipped stage's outputs are not downloaded"

    teammate = fresh("teammate")
    teammate.dvc("exp", "pull", "origin", "cloud-exp")
    table = list(csv.DictReader(io.StringIO(teammate.dvc("exp", "show", "--csv").stdout)))
    (row,) = [r for r in table if r["Experiment"] == "cloud-exp"]
    assert row["report.significance_level"] == "0.1"
    baseline = next(r for r in table if r["Experiment"] == "" and r["rev"] == "main")
    assert row["report.significance_level"] != baseline["report.significance_level"]
    metric_columns = [k for k in row if k.startswith("metrics/")]
    assert metric_columns and all(row[k] not in ("", "-") for k in metric_columns if "eval.json" in k)
    # The experiment's outputs are in the remote: applying it and pulling restores a clean workspace.
    teammate.dvc("exp", "apply", "cloud-exp")
    teammate.dvc("pull")
    assert teammate.dvc("status").stdout.strip() == "Data and pipelines are up to date."


def test_the_skypilot_tasks_parse_with_skypilots_loader(tmp_path):
    """Every cloud/*.sky.yaml through SkyPilot's own Task loader (the `make sky-venv` venv: skypilot's pins
    conflict with the main lock), with the --env / --secret values `sky launch` would add."""
    sky_python = REPO / ".sky-venv" / "bin" / "python"
    if not sky_python.exists():
        pytest.skip("SkyPilot is not installed: `make sky-venv` (which `make test` runs) installs it")
    script = r"""
import json, sys, yaml, sky
out = {}
for path in sys.argv[1:]:
    config = yaml.safe_load(open(path))
    try:
        sky.Task.from_yaml_config(dict(config))
        bare = "parsed"
    except ValueError as exc:
        bare = str(exc)
    envs = [("GIT_URL", "ssh://git@example.com/team/dpo.git"), ("CHECKPOINT_BUCKET", "s3://bucket/ckpt")]
    task = sky.Task.from_yaml_config(config, env_overrides=envs, secrets_overrides=[("HF_TOKEN", "hf_x")])
    out[path] = {
        "bare": bare, "num_nodes": task.num_nodes, "workdir": task.workdir, "run": task.run,
        "envs": task.envs, "spot": sorted({r.use_spot for r in task.resources}),
        "accelerators": sorted(str(r.accelerators) for r in task.resources),
        "mounts": sorted((task.storage_mounts or {}) | (task.file_mounts or {})),
    }
print(json.dumps(out))
"""
    tasks = sorted((REPO / "cloud").glob("*.sky.yaml"))
    assert {t.name for t in tasks} == {"pipeline.sky.yaml", "multinode.sky.yaml", "spot.sky.yaml"}
    home = tmp_path / "home"  # `import sky` writes ~/.sky
    home.mkdir()
    result = subprocess.run(
        [str(sky_python), "-c", script, *map(str, tasks)], capture_output=True, text=True, timeout=300,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    parsed = {Path(k).name: v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    for name, task in parsed.items():
        assert "GIT_URL" in task["bare"] and "None" in task["bare"], (name, task["bare"])  # --env is required
        assert task["run"].strip() == "bash cloud/run.sh"
        assert task["workdir"] == {"url": "ssh://git@example.com/team/dpo.git", "ref": "main"}
        assert not any("TOKEN" in k or "SECRET" in k for k in task["envs"]), "secrets are never envs"
    assert parsed["pipeline.sky.yaml"]["num_nodes"] == 1
    assert parsed["multinode.sky.yaml"]["num_nodes"] == 2
    assert "train.num_nodes=2" in parsed["multinode.sky.yaml"]["envs"]["PARAMS"]
    assert parsed["spot.sky.yaml"]["spot"] == [True] and parsed["pipeline.sky.yaml"]["spot"] == [False]
    assert "/checkpoints" in parsed["spot.sky.yaml"]["mounts"]
    assert "launch.checkpoint_dir=/checkpoints/train" in parsed["spot.sky.yaml"]["envs"]["PARAMS"]
