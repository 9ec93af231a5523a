"""Lineage through the artifacts, from a real train run: its MLflow run is tagged with the adapter's sha256,
merge and evaluate find it by that content hash and tag its id, and no file any stage reads holds it."""

from __future__ import annotations

import json

import pytest

from dpo_pipeline import tracking
from dpo_pipeline.io import sha256_tree

pytestmark = pytest.mark.slow


def test_the_train_run_is_found_by_the_adapters_content_and_written_into_no_output(tiny_project):
    import mlflow

    mlflow.set_tracking_uri(tiny_project.env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'train'")
    finished = runs[runs["status"] == "FINISHED"]
    assert len(finished) == 1, runs[["run_id", "status"]]
    train_run_id = finished.iloc[0]["run_id"]
    adapter = tiny_project.root / "models" / "adapter"
    assert finished.iloc[0][f"tags.{tracking.ADAPTER_SHA256_TAG}"] == sha256_tree(adapter)

    merged = tiny_project.root / "models" / "merged"
    assert json.loads((merged / "pipeline_merge.json").read_text())["adapter_sha256"] == sha256_tree(adapter)
    # No output that a later stage hashes carries the run id: identical bytes re-run nothing downstream.
    for folder in ("models/adapter", "models/merged", "metrics"):
        for path in (tiny_project.root / folder).glob("*"):
            if path.suffix in (".json", ".md", ".csv"):
                assert train_run_id not in path.read_text(errors="ignore"), path
    assert not (tiny_project.root / "metrics" / "train_run.json").exists()  # the run id file of old: gone
    timing = tiny_project.read_json("metrics/train_timing.json")  # timings only, no run id
    assert set(timing) == {"train_runtime_s", "pairs_per_s", "tokens_per_s", "pad_fraction", "peak_memory_mb"}
    for stage in ("merge", "evaluate"):
        tagged = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.stage = '{stage}'")
        assert list(tagged["tags.lineage.train_run_id"]) == [train_run_id], stage
