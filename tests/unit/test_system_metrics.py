"""Issue 28 item 5: each stage's MLflow run records the machine's CPU and memory over time (MLflow's own system
metrics, psutil), every tracking.system_metrics_interval_s; off when tracking.system_metrics is false."""

from __future__ import annotations

import os
import time

import pytest

from dpo_pipeline import tracking
from tests.conftest import replace_params


@pytest.mark.parametrize("enabled", [True, False])
def test_a_stage_run_records_system_metrics(default_params, enabled):
    from mlflow.tracking import MlflowClient

    params = replace_params(
        default_params, tracking={"system_metrics": enabled, "system_metrics_interval_s": 0.5}
    )
    with tracking.stage_run("probe", params, sections=["seed"]) as run:
        time.sleep(2.0)
    data = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run.info.run_id).data
    recorded = {k for k in data.metrics if k.startswith("system/")}
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= recorded
        history = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(
            run.info.run_id, "system/cpu_utilization_percentage"
        )
        assert len(history) >= 2  # over time, not once
    else:
        assert not recorded
