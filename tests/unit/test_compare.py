"""tools.compare: the metric diff, the table, rev resolution and the run selection (no MLflow server)."""

from __future__ import annotations

import math
import subprocess
from types import SimpleNamespace

import pytest

from dpo_pipeline.errors import StageError
from tools import compare


def test_diff_metrics_covers_both_sides_sorted():
    rows = compare.diff_metrics(
        {"loss": 1.0, "acc": 0.5, "only_a": 3.0}, {"loss": 0.75, "acc": 0.5, "only_b": 2.0}
    )
    assert [r.metric for r in rows] == ["acc", "loss", "only_a", "only_b"]
    by_name = {r.metric: r for r in rows}
    assert by_name["loss"].delta == pytest.approx(-0.25)
    assert by_name["acc"].delta == 0 and not by_name["acc"].changed
    assert by_name["loss"].changed
    assert by_name["only_a"].b is None and by_name["only_a"].delta is None and by_name["only_a"].changed
    assert by_name["only_b"].a is None and by_name["only_b"].changed


def test_nan_on_both_sides_is_not_a_change():
    (row,) = compare.diff_metrics({"m": math.nan}, {"m": math.nan})
    assert not row.changed


def test_format_table_columns_and_signs():
    rows = compare.diff_metrics({"eval/acc": 0.5, "steps": 6.0}, {"eval/acc": 0.625, "steps": 6.0})
    text = compare.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "A", "B", "delta"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    acc = next(line for line in lines if line.startswith("eval/acc"))
    assert acc.split() == ["eval/acc", "0.5", "0.625", "+0.125"]
    steps = next(line for line in lines if line.startswith("steps"))
    assert steps.split() == ["steps", "6", "6", "0"]
    # every data row lines up with the header
    assert len({len(line) for line in lines[:2]}) == 1


def test_format_table_only_changed_and_empty():
    rows = compare.diff_metrics({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 3.0})
    text = compare.format_table(rows, only_changed=True)
    assert "b" in text.split() and not any(line.startswith("a ") for line in text.splitlines())
    assert "(no metric changed)" in compare.format_table(compare.diff_metrics({"a": 1.0}, {"a": 1.0}), True)
    assert "(no metrics)" in compare.format_table([])


def _run(stage, commit, metrics, dirty=False, run_id="r"):
    return compare.RunInfo(
        run_id=run_id, stage=stage, commit=commit, dirty=dirty, start_time=0, metrics=metrics
    )


def test_format_report_orders_stages_and_flags_missing_and_dirty():
    a = {
        "train": _run("train", "a" * 40, {"loss": 1.0}),
        "evaluate": _run("evaluate", "a" * 40, {"acc": 0.5}),
    }
    b = {
        "train": _run("train", "b" * 40, {"loss": 0.5}, dirty=True),
        "prepare": _run("prepare", "b" * 40, {}),
    }
    text = compare.format_report("main", "exp", a, b)
    headers = [line for line in text.splitlines() if line.startswith("==")]
    assert headers == ["== prepare ==", "== train ==", "== evaluate =="]
    assert "main: no FINISHED run of this stage" in text  # prepare has no run for A
    assert "git.dirty=true" in text
    train_section = text.split("== train ==")[1].split("==")[0]
    assert "-0.5" in train_section


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_resolve_rev_branch_short_sha_and_foreign_full_sha(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "f").write_text("x")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-q", "-m", "one")
    full = _git(tmp_path, "rev-parse", "HEAD")
    monkeypatch.chdir(tmp_path)
    assert compare.resolve_rev("main") == full
    assert compare.resolve_rev(full[:7]) == full
    foreign = "ab" * 20
    assert compare.resolve_rev(foreign) == foreign  # a commit made elsewhere: taken as is
    assert compare.resolve_rev(foreign.upper()) == foreign
    with pytest.raises(StageError, match="cannot resolve 'no-such-branch'"):
        compare.resolve_rev("no-such-branch")


class FakeClient:
    """Just enough of MlflowClient.search_runs: honours the commit/stage filter and the order."""

    def __init__(self, runs):
        self.runs = runs
        self.filters = []

    def search_runs(self, experiment_ids, filter_string, order_by):
        self.filters.append(filter_string)
        assert order_by == ["attributes.start_time DESC"]
        picked = [r for r in self.runs if f"'{r.data.tags['git.commit']}'" in filter_string]
        picked = [r for r in picked if r.info.status == "FINISHED"]
        if "tags.stage" in filter_string:
            picked = [r for r in picked if f"tags.stage = '{r.data.tags['stage']}'" in filter_string]
        return sorted(picked, key=lambda r: -r.info.start_time)


def _mlflow_run(run_id, stage, commit, start, metrics, status="FINISHED"):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=start, status=status),
        data=SimpleNamespace(
            tags={"stage": stage, "git.commit": commit, "git.dirty": "false"}, metrics=metrics
        ),
    )


def test_latest_runs_picks_newest_finished_per_stage():
    sha = "c" * 40
    client = FakeClient(
        [
            _mlflow_run("old", "train", sha, 1, {"loss": 2.0}),
            _mlflow_run("new", "train", sha, 5, {"loss": 1.0}),
            _mlflow_run("failed", "train", sha, 9, {"loss": 9.0}, status="FAILED"),
            _mlflow_run("eval", "evaluate", sha, 3, {"acc": 0.5}),
            _mlflow_run("other", "train", "d" * 40, 7, {"loss": 0.1}),
        ]
    )
    runs = compare.latest_runs(client, "1", sha)
    assert {k: v.run_id for k, v in runs.items()} == {"train": "new", "evaluate": "eval"}
    assert runs["train"].metrics == {"loss": 1.0}
    assert "tags.`git.commit`" in client.filters[0] and "FINISHED" in client.filters[0]
    only = compare.latest_runs(client, "1", sha, stage="evaluate")
    assert list(only) == ["evaluate"]


def test_find_runs_falls_back_to_first_parent_ancestors(tmp_path, monkeypatch):
    _git(tmp_path, "init", "-q", "-b", "main")
    shas = []
    for name in ("params", "lock"):
        (tmp_path / name).write_text(name)
        _git(tmp_path, "add", name)
        _git(tmp_path, "commit", "-q", "-m", name)
        shas.append(_git(tmp_path, "rev-parse", "HEAD"))
    monkeypatch.chdir(tmp_path)
    candidates = compare.first_parent_ancestors(shas[1], max_back=5)
    assert candidates == [shas[1], shas[0]]
    assert compare.first_parent_ancestors(shas[1], max_back=0) == [shas[1]]
    assert compare.first_parent_ancestors("ef" * 20, max_back=5) == ["ef" * 20]  # unknown here: as is
    client = FakeClient([_mlflow_run("r1", "prepare", shas[0], 1, {"rows": 3.0})])
    used, runs = compare.find_runs(client, "1", candidates)
    assert used == shas[0] and runs["prepare"].run_id == "r1"
    used, runs = compare.find_runs(client, "1", [shas[1]])
    assert used == shas[1] and runs == {}


def test_an_experiment_is_compared_by_its_name(tmp_path, monkeypatch):
    """`dvc exp run -n beta02` runs carry dvc.exp.name: compare finds them by that name (bare, or exp:NAME), in a
    real MLflow store, beside a commit's runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "params").write_text("beta 0.1")
    _git(tmp_path, "add", "params")
    _git(tmp_path, "commit", "-q", "-m", "params")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("dpo")
    for tags, loss in (
        ({"stage": "train", "git.commit": sha, "git.dirty": "false"}, 1.0),
        ({"stage": "train", "git.commit": sha, "git.dirty": "true", "dvc.exp.name": "beta02"}, 0.5),
    ):
        run = client.create_run(exp_id, tags=tags)
        client.log_metric(run.info.run_id, "train_loss", loss)
        client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(uri)
    for name in ("beta02", "exp:beta02"):
        out = compare.run("main", name, "dpo", tracking_uri=uri)
        assert f"B = {name} (experiment beta02)" in out
        row = next(line for line in out.splitlines() if "train_loss" in line)
        assert "1" in row and "0.5" in row and "-0.5" in row, row
    with pytest.raises(StageError, match="cannot resolve 'nope'"):
        compare.run("main", "nope", "dpo", tracking_uri=uri)
