"""Issue 27, point 6: too little data is said, not hidden. A 35-row dataset trains (the mechanics work) but the
report marks its scores not meaningful, says why on stderr, in eval.json, the card and the headline, and no model
version is registered."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_a_35_row_dataset_warns_and_registers_nothing(clone):
    from mlflow.tracking import MlflowClient

    project = clone("small-data")
    raw = project.root / project.params()["data"]["path"]
    # a file of its own: the base's corpus is unchanged, the base not re-run
    small = raw.with_name("small.jsonl")
    small.write_text("".join(raw.read_text().splitlines(keepends=True)[:35]))
    project.git("add", str(small))
    # the repo's own threshold (the tiny project lowers it to test mechanics on 8 documents)
    project.set_params(
        {
            "data.path": str(small.relative_to(project.root)),
            "report.min_heldout_pairs": 100,
            "data.test_fraction": 0.2,
        }
    )
    project.git("commit", "-qam", "35 rows")  # a clean commit: only the data stops the registration
    result = project.dvc("repro", timeout=900)
    assert "scores not meaningful: only" in result.stderr + result.stdout
    scores = project.read_json("metrics/eval.json")
    assert scores["meaningful"] == 0.0
    assert any("held-out pairs (report.min_heldout_pairs 100)" in p for p in scores["meta"]["not_meaningful"])
    assert "**Not meaningful:**" in (project.root / "metrics" / "eval_card.md").read_text()
    headline = project.python("-m", "tools.headline").stdout
    assert "NOT MEANINGFUL" in headline

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp_id = client.get_experiment_by_name(project.params()["tracking"]["experiment"]).experiment_id
    (report,) = client.search_runs([exp_id], filter_string="tags.stage = 'report'", max_results=1)
    assert report.data.tags["model.registered"] == "no"
    name = project.params()["tracking"]["experiment"] + "-merged"
    assert client.search_model_versions(f"name = '{name}'") == []
