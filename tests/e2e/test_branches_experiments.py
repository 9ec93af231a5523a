"""Issues 3 and 5.2/5.3: a train.beta edit re-runs only train and what follows it; diffs between two
branches (params, every metric, plots); `dvc exp run -S` and a queued sweep."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pytest

pytestmark = pytest.mark.slow

METRIC_FILES = (
    "metrics/data.json",
    "metrics/tokens.json",
    "metrics/train.json",
    "metrics/merge.json",
    "metrics/eval.json",
    "metrics/contamination.json",
)
# validate re-checks params.yaml on every params edit (about a second); its marker never changes.
DOWNSTREAM_OF_TRAIN = {"validate", "train", "merge", "evaluate", "report"}


def numeric_leaves(data: Any, prefix: str = "") -> dict[str, float]:
    """Flatten a metrics JSON the way DVC names its keys (dots), keeping numbers only."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix] = data
    return out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def skipped_stages(output: str) -> set[str]:
    return set(re.findall(r"Stage '([\w-]+)' didn't change, skipping", output))


def test_two_branches_diff_params_metrics_plots(clone, tmp_path):
    project = clone("branches")
    project.git("checkout", "-q", "-b", "beta-0.3")
    project.set_params({"train.beta": 0.3})
    # issue 3: only train and what follows it are stale; base, prepare, tokenize and reference are not
    status = project.dvc("status").stdout
    assert "train:" in status and not re.search(r"^(base|prepare|tokenize|reference):", status, re.MULTILINE)
    out = project.dvc("repro").stdout
    assert ran_stages(out) == DOWNSTREAM_OF_TRAIN, out
    assert {
        "base",
        "prepare",
        "tokenize",
        "reference",
        "evaluate_base",
        "evaluate_base_heldout",
    } <= skipped_stages(out)
    project.commit("train.beta 0.3")
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."

    params = json.loads(project.dvc("params", "diff", "main", "beta-0.3", "--json").stdout)
    assert list(params) == ["params.yaml"] and list(params["params.yaml"]) == ["train.beta"]
    beta = params["params.yaml"]["train.beta"]
    assert (beta["old"], beta["new"]) == (0.1, 0.3) and beta["diff"] == pytest.approx(0.2)

    # every numeric metric of every metrics file shows up (unchanged ones too, with --all)
    metrics = json.loads(project.dvc("metrics", "diff", "main", "beta-0.3", "--all", "--json").stdout)
    for rel in METRIC_FILES:
        expected = numeric_leaves(project.read_json(rel))
        assert rel in metrics, f"{rel} missing from dvc metrics diff: {sorted(metrics)}"
        missing = set(expected) - set(metrics[rel])
        assert not missing, f"{rel}: {sorted(missing)} missing from dvc metrics diff"
        for key, value in expected.items():
            assert metrics[rel][key]["new"] == pytest.approx(value), (rel, key)
    # issue 16's figures are among them: uncertainty, length, calibration, contamination
    for key in (
        "dpo_heldout_pref/acc_norm_delta_stderr",
        "dpo_heldout_pref/acc_norm_significant",
        "dpo_heldout_pref/acc_norm_length_controlled_delta",
        "samples/length_mean_tokens_delta",
        "calibration/flagged",
    ):
        assert key in metrics["metrics/eval.json"], key
    assert "dpo_heldout_pref/rows_overlapping" in metrics["metrics/contamination.json"]
    # data.json does not depend on beta; train.json does
    assert all(entry.get("diff", 0) == 0 for entry in metrics["metrics/data.json"].values())
    assert any(entry.get("diff", 0) != 0 for entry in metrics["metrics/train.json"].values())
    # without --all only changed metrics are listed, and data.json is not among them
    changed = json.loads(project.dvc("metrics", "diff", "main", "beta-0.3", "--json").stdout)
    assert "metrics/data.json" not in changed and "metrics/train.json" in changed
    table = project.dvc("metrics", "diff", "main", "beta-0.3").stdout
    assert "metrics/train.json" in table and "train_loss" in table

    # plots: both revisions' training curves, as JSON and as a rendered HTML page
    plots = json.loads(project.dvc("plots", "diff", "main", "beta-0.3", "--json").stdout)
    loss = plots["data"]["loss"]
    assert set(loss[0]["revisions"]) == {"main", "beta-0.3"}
    revs = {row["rev"] for row in loss[0]["content"]["data"]["values"]}
    assert revs == {"main", "beta-0.3"}
    html_dir = tmp_path / "plots"
    project.dvc("plots", "diff", "main", "beta-0.3", "-o", str(html_dir))
    page = (html_dir / "index.html").read_text()
    assert "beta-0.3" in page and "rewards/margins" in page

    # comparing the workspace with a branch works the same way (no commit needed)
    project.git("checkout", "-q", "main")
    project.dvc("checkout", "-q")
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."


def find_experiment(show: list[dict], name: str) -> dict:
    """The `dvc exp show --json` record of experiment `name` (DVC 3 layout: baseline -> experiments -> revs)."""
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            if experiment.get("name") == name:
                return experiment["revs"][0]
    raise AssertionError(f"experiment {name!r} not in dvc exp show --json: {json.dumps(show)[:2000]}")


def experiment_metrics(record: dict) -> dict[str, dict]:
    return {path: entry["data"] for path, entry in (record["data"].get("metrics") or {}).items()}


def test_exp_run_set_param_and_exp_show(clone):
    project = clone("exp")
    out = project.dvc("exp", "run", "-S", "train.beta=0.2", "-n", "beta02").stdout
    assert ran_stages(out) == DOWNSTREAM_OF_TRAIN, out
    show = json.loads(project.dvc("exp", "show", "--json").stdout)
    record = find_experiment(show, "beta02")
    assert record["data"]["params"]["params.yaml"]["data"]["train"]["beta"] == 0.2
    metrics = experiment_metrics(record)
    for rel in METRIC_FILES:
        assert numeric_leaves(metrics[rel]), f"{rel} has no metrics in exp show"
    assert metrics["metrics/train.json"] == project.read_json("metrics/train.json")
    # the table users read (as CSV, so no terminal width truncates it): one row per experiment
    rows = list(csv.DictReader(io.StringIO(project.dvc("exp", "show", "--csv").stdout)))
    row = next(r for r in rows if r["Experiment"] == "beta02")
    assert float(row["train.beta"]) == 0.2
    assert float(row["train_loss"]) == pytest.approx(metrics["metrics/train.json"]["train_loss"])
    assert row["dpo_heldout_pref/acc_norm"] != ""
    # MLflow places the experiment's runs: named after it, tagged with its name and baseline, a params
    # fingerprint of their own, and no registry version (tracking.register: clean)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp_id = client.get_experiment_by_name(project.params()["tracking"]["experiment"]).experiment_id
    runs = client.search_runs([exp_id], filter_string="tags.`dvc.exp.name` = 'beta02'")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == DOWNSTREAM_OF_TRAIN - {"validate"}, sorted(by_stage)
    for stage, run in by_stage.items():
        assert run.info.run_name == f"{stage}@beta02"
        assert run.data.tags["dvc.exp.baseline"] == project.head()
    assert re.fullmatch(r"[0-9a-f]{16}", by_stage["train"].data.tags["params.fingerprint"])
    # what `dvc metrics diff` lists after the experiment is the model's change, not the clock or run ids
    diff = json.loads(project.dvc("metrics", "diff", "--json").stdout)
    changed = {metric for entries in diff.values() for metric in entries}
    assert "train_loss" in changed
    assert not changed & {
        "train_runtime_s",
        "pairs_per_s",
        "tokens_per_s",
        "peak_memory_mb",
        "meta.mlflow_model_id",
    }
    assert by_stage["report"].data.tags["model.registered"] == "no"
    # the experiment is a real commit: it can become a branch, and the workspace is left consistent
    project.dvc("exp", "branch", "beta02", "exp-beta02")
    assert "exp-beta02" in project.git("branch").stdout
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."


def test_queued_sweep(clone):
    project = clone("queue")
    project.dvc("exp", "run", "--queue", "-S", "train.beta=0.05,0.4")
    queued = project.dvc("queue", "status").stdout
    assert queued.count("Queued") == 2, queued
    # one worker runs the queued experiments one after the other, each in a temporary copy of the repo
    # (`-j 2` was no faster on 2 cores, and two stages creating a fresh SQLite tracking store at once race
    # on its schema migration: use a tracking server with parallel workers)
    project.dvc("queue", "start", "-j", "1")
    try:
        _wait_queue_empty(project)
    finally:
        project.dvc("queue", "stop", "--kill", check=False)  # no worker outlives the test
    show = json.loads(project.dvc("exp", "show", "--json").stdout)
    betas = set()
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            record = experiment["revs"][0]
            if record.get("error"):
                raise AssertionError(f"queued experiment failed: {record['error']}")
            betas.add(record["data"]["params"]["params.yaml"]["data"]["train"]["beta"])
            assert numeric_leaves(experiment_metrics(record)["metrics/eval.json"])
    assert betas == {0.05, 0.4}


def _wait_queue_empty(project, timeout: float = 900) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = project.dvc("queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            assert "Failed" not in status, status
            return
        time.sleep(2)
    raise AssertionError(f"queue did not drain in {timeout} s:\n{status}")
