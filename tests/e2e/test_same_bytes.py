"""Issue 23: an edit re-runs only what it can change, on the real `dvc` CLI. A library edit re-runs only the
stages whose output it can change; a train re-run that reproduces the adapter byte for byte leaves merge and
every evaluation up to date (no run id or timing in any file a later stage hashes)."""

from __future__ import annotations

import pytest

from tests.e2e.test_pipeline_graph import stages_in_status

pytestmark = pytest.mark.slow


def lock_md5(project, path: str) -> str:
    import yaml

    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


def test_an_edit_to_the_training_glue_re_runs_reference_and_train_only(clone):
    project = clone("edit-glue")
    for module in ("dpo_pipeline/train/trl_glue.py", "dpo_pipeline/train/shared_prompt.py"):
        with open(project.root / module, "a", encoding="utf-8") as fh:
            fh.write("\n# an edit that changes nothing a stage makes\n")
    assert stages_in_status(project.dvc("status").stdout) == {"reference", "train"}


def test_an_edit_to_the_report_re_runs_the_report_only(clone):
    project = clone("edit-report")
    with open(project.root / "dpo_pipeline/evaluate/report.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    assert stages_in_status(project.dvc("status").stdout) == {"report"}


def test_retraining_to_the_same_adapter_leaves_merge_and_the_evaluations_up_to_date(clone):
    project = clone("retrain")
    adapter = lock_md5(project, "models/adapter")
    out = project.dvc("repro", "--force", "--single-item", "train").stdout
    assert "Running stage 'train'" in out
    assert lock_md5(project, "models/adapter") == adapter, "training is not deterministic here"
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    out = project.dvc("repro").stdout
    assert "Running stage" not in out, out
