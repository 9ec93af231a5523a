"""Lineage through the artifacts, from a real train run: the id the train stage's MLflow run got reaches
metrics/train_run.json, the merged model card and pipeline_merge.json, and the evaluate run's tags."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_the_train_run_id_reaches_the_merged_model_and_the_evaluate_run(tiny_project):
    import mlflow

    mlflow.set_tracking_uri(tiny_project.env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'train'")
    finished = runs[runs["status"] == "FINISHED"]
    assert len(finished) == 1, runs[["run_id", "status"]]
    train_run_id = finished.iloc[0]["run_id"]

    assert tiny_project.read_json("metrics/train_run.json") == {"mlflow_run_id": train_run_id}
    merged = tiny_project.root / "models" / "merged"
    assert json.loads((merged / "pipeline_merge.json").read_text())["train_run_id"] == train_run_id
    assert f"`{train_run_id}`" in (merged / "README.md").read_text()
    # the adapter folder itself does not carry it: identical weights stay a byte-identical folder
    assert train_run_id not in "".join(
        p.read_text(errors="ignore") for p in (tiny_project.root / "models" / "adapter").glob("*.json")
    )
    for stage in ("merge", "evaluate"):
        tagged = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.stage = '{stage}'")
        assert list(tagged["tags.lineage.train_run_id"]) == [train_run_id], stage
