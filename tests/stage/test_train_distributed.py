"""train stage as several processes: `python -m stages.train` with train.num_processes 2 launches two CPU
workers (torchrun, gloo) that train one adapter; only rank 0 records in MLflow and publishes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_pipeline.train import pairs as pairs_lib
from tests.conftest import REPO, replace_params
from tests.stage import test_train as single_process
from tests.stage.test_train import load_adapter, train_runs

# The single-process tests' fixtures (the tiny tokenized data and its cached reference log-probs).
train_params = single_process.train_params
tokenized_dir = single_process.tokenized_dir
reference_dir = single_process.reference_dir

STEPS = 3
PROCESSES = 2


def params_yaml(params) -> str:
    import dataclasses

    return yaml.safe_dump(dataclasses.asdict(params), sort_keys=False)


def repo_layout(root: Path, params, tiny_base_dir: Path, tokenized_dir: Path) -> Path:
    """A working directory laid out like the repo: params.yaml, models/base, data/tokenized, and data/pairs and
    data/reference made for `params` by the pairs stage's functions and the reference stage (more processes
    consume more pairs per step, so the selection and its reference log-probs differ from the fixtures')."""
    from stages import reference

    shutil.copytree(tiny_base_dir, root / "models" / "base")
    shutil.copytree(tokenized_dir, root / "data" / "tokenized")
    selected, order, _ = pairs_lib.build(params, root / "data" / "tokenized")
    pairs_lib.write(root / "data" / "pairs", selected, order)
    reference.run(
        params, root / "models" / "base", root / "data" / "tokenized", root / "data" / "reference",
        root / "data" / "pairs",
    )  # fmt: skip
    (root / "params.yaml").write_text(params_yaml(params), encoding="utf-8")
    return root


@pytest.mark.slow
def test_two_cpu_processes_train_one_adapter(tmp_path, train_params, tiny_base_dir, tokenized_dir):
    from mlflow.tracking import MlflowClient

    params = replace_params(train_params, train={"num_processes": PROCESSES, "max_steps": STEPS})
    work = repo_layout(tmp_path / "work", params, tiny_base_dir, tokenized_dir)
    # OMP_NUM_THREADS keeps two workers from fighting over the cores of a small CI machine.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # Two workers in one gloo group, launched by torchrun.
    assert "torch.distributed.run --nnodes 1 --nproc_per_node 2 --node_rank 0 --master_addr 127.0.0.1" in log
    for rank in range(PROCESSES):
        assert f"[rank {rank}] stages.train: process {rank} of {PROCESSES} (MULTI_CPU, cpu" in log, log[
            -4000:
        ]

    # A valid adapter, published once.
    adapter = work / "models" / "adapter"
    weights = load_adapter(adapter)
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b), "LoRA B starts at zero: training must move it"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == params.train.lora.r and config["base_model_name_or_path"] == "models/base"
    assert not list((work / "models").glob(".adapter.tmp-*")), "no temporary sibling left behind"

    metrics = {
        **json.loads((work / "metrics" / "train.json").read_text()),
        **json.loads((work / "metrics" / "train_timing.json").read_text()),
    }
    assert metrics["train_steps"] == STEPS
    # The global batch is per_device_train_batch_size * num_processes: the pairs of both workers are counted.
    pairs = round(metrics["pairs_per_s"] * metrics["train_runtime_s"])
    assert pairs == STEPS * params.train.per_device_train_batch_size * PROCESSES
    with open(work / "metrics" / "train_history.csv") as fh:
        assert [int(row["step"]) for row in csv.DictReader(fh)] == list(range(1, STEPS + 1))
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["params"]["train"]["num_processes"] == PROCESSES
    assert summary["metrics"]["train_loss"] == pytest.approx(metrics["train_loss"])
    assert not any((work / ".scratch" / "checkpoints" / "train").glob("*/checkpoint-*"))

    # Exactly one MLflow run (rank 0's), finished, with transformers' step metrics in it.
    (run,) = train_runs(params)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_processes"] == str(PROCESSES)
    assert run.data.tags["output.adapter.path"]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_failing_worker_fails_the_stage(tmp_path, train_params, tiny_base_dir, tokenized_dir):
    """The launcher exits with the workers' failure, their one-line error is in the log, nothing is published."""
    params = replace_params(train_params, train={"num_processes": PROCESSES, "max_steps": STEPS})
    work = repo_layout(tmp_path / "work", params, tiny_base_dir, tokenized_dir)
    (work / "data" / "reference" / "meta.json").unlink()
    # A store that does not exist yet: the launcher creates it before the workers start, so a failing worker
    # cannot get rank 0 stopped in the middle of MLflow's database migrations.
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=uri)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "error: data/reference/meta.json: not found (train.precompute_ref is true" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the train workers failed (exit code 1)")
    assert not (work / "models" / "adapter").exists() and not (work / "metrics").exists()
    # Rank 0 ends its run FAILED on its own error, or KILLED when torchrun stopped it after rank 1's; never
    # left RUNNING, and the store is intact.
    (run,) = train_runs(params, uri)
    assert run.info.status in ("FAILED", "KILLED")


def test_run_refuses_a_process_group_of_another_size(
    tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir, monkeypatch
):
    """run() called directly (not through main's launcher) must not train 2-process params in 1 process."""
    from dpo_pipeline.errors import StageError
    from stages import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = replace_params(train_params, train={"num_processes": PROCESSES})
    with pytest.raises(
        StageError,
        match=r"train\.num_processes x train\.num_nodes is 2 but this process runs in a group of 1",
    ):
        train.run(
            params,
            tiny_base_dir,
            tokenized_dir,
            reference_dir,
            tmp_path / "adapter",
            tmp_path / "t.json",
            pairs_dir=tokenized_dir.parent / "pairs",
        )
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "t.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name(params.tracking.experiment) is None, "refused before tracking"


def test_secondary_ranks_do_not_track(train_params, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from dpo_pipeline import tracking

    monkeypatch.setenv("RANK", "1")
    with tracking.stage_run("train", train_params, sections=["seed"], inputs={"x": tmp_path}) as run:
        assert run is None
        tracking.log_metrics({"loss": 1.0})
        tracking.set_tags({"a": "b"})
        tracking.log_outputs({"adapter": tmp_path})
        tracking.log_artifact(tmp_path / "missing")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name(train_params.tracking.experiment) is None

    monkeypatch.setenv("RANK", "0")
    with tracking.stage_run("train", train_params, sections=["seed"]) as run:
        assert run is not None
