"""Tracking faults that must not pass silently (issue 14): a run whose logging broke does not end FINISHED,
and the launcher's store preparation reports what went wrong instead of swallowing it."""

from __future__ import annotations

import pytest

from dpo_pipeline import config, tracking
from tests.conftest import REPO


@pytest.fixture
def params():
    return config.load(REPO / "params.yaml")


def test_a_run_whose_logging_broke_ends_failed_with_the_reason(params, monkeypatch, capsys):
    import mlflow

    def broken(*_a, **_k):
        raise ConnectionError("server went away")

    with tracking.stage_run("prepare", params, sections=["seed"]) as run:
        monkeypatch.setattr(mlflow, "log_metrics", broken)
        tracking.log_metrics({"rows": 1.0})  # fails: reported once, the stage goes on
        tracking.log_metrics({"rows": 2.0})  # skipped
        monkeypatch.undo()
    assert capsys.readouterr().err.count("warning: MLflow tracking failed") == 1
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags["tracking.incomplete"] == "true"
    assert "ConnectionError: server went away" in finished.data.tags["tracking.error"]


def test_a_run_whose_logging_worked_ends_finished(params):
    import mlflow

    with tracking.stage_run("prepare", params, sections=["seed"]) as run:
        tracking.log_metrics({"rows": 1.0})
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and "tracking.incomplete" not in finished.data.tags


def test_preparing_the_store_before_launch_warns_on_a_tracking_error_and_raises_others(
    params, monkeypatch, capsys
):
    import mlflow
    from mlflow.exceptions import MlflowException

    def store_error(*_a, **_k):
        raise MlflowException("database is locked")

    monkeypatch.setattr(mlflow, "set_experiment", store_error)
    tracking.prepare_store(params)
    err = capsys.readouterr().err
    assert "warning: preparing the MLflow store" in err and "database is locked" in err

    def bug(*_a, **_k):
        raise TypeError("a bug, not a store problem")

    monkeypatch.setattr(mlflow, "set_experiment", bug)
    with pytest.raises(TypeError, match="a bug"):
        tracking.prepare_store(params)


def test_a_zombie_stage_process_counts_as_gone():
    """A SIGKILLed stage whose parent died too can stay a zombie (PID 1 of a container may never reap it):
    its RUNNING run must still be closed by the next run of the stage."""
    import subprocess
    import time
    from pathlib import Path

    child = subprocess.Popen(["true"])  # exits at once; not waited for, so it stays a zombie
    try:
        for _ in range(200):
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not tracking._pid_alive(child.pid)
    finally:
        child.wait()
    assert tracking._pid_alive(__import__("os").getpid())


# Issue 24: a store that cannot be created used to hang in MLflow's engine retries (110 warnings, still running
# after 5 minutes), and `sqlite:///` silently recorded into an in-memory database.
@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?mode=memory"])
def test_an_in_memory_store_is_refused(uri):
    with pytest.raises(tracking.StageError, match="in-memory SQLite store: every run would be lost"):
        tracking.check_store(uri)


def test_a_store_that_cannot_be_created_fails_in_one_line_fast(params, monkeypatch, tmp_path):
    import time

    for uri, message in (
        ("sqlite:////proc/mlflow.db", r"/proc/mlflow\.db cannot be opened or created"),
        (f"sqlite:///{tmp_path}/no/such/folder/mlflow.db", r"folder .*/no/such/folder does not exist"),
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(tracking.StageError, match=message) as info:
            with tracking.stage_run("prepare", params, sections=["seed"]):
                raise AssertionError("the stage must not start")
        assert time.monotonic() - started < 10 and "\n" not in str(info.value)
        assert "MLFLOW_TRACKING_URI" in str(info.value)


def test_a_writable_store_passes_and_is_created(tmp_path):
    tracking.check_store(f"sqlite:///{tmp_path}/mlflow.db")
    assert (tmp_path / "mlflow.db").is_file()
