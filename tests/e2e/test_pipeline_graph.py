"""Issue 2: the stage graph and what a params edit invalidates, on the real `dvc` CLI."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

ALL_STAGES = {
    "validate",
    "base",
    "prepare",
    "decontaminate",
    "tokenize",
    "pairs",
    "reference",
    "train",
    "merge",
    "evaluate_base",
    "evaluate_base_heldout",
    "evaluate",
    "report",
}


def stages_in_status(output: str) -> set[str]:
    """Stage names `dvc status` reports as changed (lines like `prepare:` at column 0)."""
    return {m.group(1) for m in re.finditer(r"^([\w-]+):\s*$", output, re.MULTILINE)} & ALL_STAGES


def test_session_repro_ran_every_stage(tiny_project):
    ran = set(re.findall(r"Running stage '([\w-]+)'", tiny_project.repro_output))
    assert ran == ALL_STAGES
    assert tiny_project.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    # the outputs every later test relies on
    for rel in (
        "models/base",
        "data/prepared",
        "data/tokenized",
        "models/adapter",
        "models/merged",
        "metrics/eval.json",
    ):
        assert (tiny_project.root / rel).exists(), rel


def test_dag_shows_base_before_prepare_and_the_full_chain(clone):
    project = clone("dag", checkout=False)
    dot = project.dvc("dag", "--dot").stdout
    edges = set(re.findall(r'"([\w-]+)"\s*->\s*"([\w-]+)"', dot))
    for edge in [
        ("validate", "base"),
        ("base", "prepare"),
        ("prepare", "decontaminate"),
        ("decontaminate", "tokenize"),
        ("prepare", "tokenize"),
        ("tokenize", "pairs"),
        ("tokenize", "reference"),
        ("tokenize", "train"),
        ("pairs", "reference"),
        ("pairs", "train"),
        ("reference", "train"),
        ("train", "merge"),
        ("merge", "evaluate"),
        ("evaluate_base", "evaluate"),
        ("evaluate_base_heldout", "evaluate"),
        ("prepare", "evaluate_base_heldout"),
        ("evaluate", "report"),
        ("evaluate_base", "report"),
        ("evaluate_base_heldout", "report"),
    ]:
        assert edge in edges, f"{edge} missing from dvc dag:\n{dot}"
    # The base's benchmark scores read no pipeline data: nothing upstream of them but the base.
    assert {a for a, b in edges if b == "evaluate_base"} == {"base"}
    ascii_dag = project.dvc("dag").stdout
    assert "base" in ascii_dag and "prepare" in ascii_dag


def test_data_param_invalidates_prepare_and_downstream_only(clone):
    project = clone("status-data")
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    project.set_params({"data.test_fraction": 0.2})
    changed = stages_in_status(project.dvc("status").stdout)
    # validate re-checks params.yaml; prepare's own params changed. Nothing else is listed.
    assert changed == {"validate", "prepare"}, "dvc status lists the stages whose own deps/params changed"
    # Re-running prepare changes data/prepared: the stages that read it are now stale (tokenize; train, whose
    # simpo/cpo/orpo/kto trainers tokenize the prepared text themselves; and merge and the held-out evaluations,
    # which read the prepared strings), while base (upstream) and the base's benchmark scores stay up to date.
    # reference reads data/tokenized, stale once tokenize re-runs.
    out = project.dvc("repro", "prepare").stdout
    assert "Running stage 'validate'" in out
    assert "Stage 'base' didn't change, skipping" in out
    assert "Running stage 'prepare'" in out
    changed = stages_in_status(project.dvc("status").stdout)
    assert changed == {"decontaminate", "tokenize", "train", "merge", "evaluate_base_heldout", "evaluate"}
    out = project.dvc("repro", "tokenize").stdout
    assert "Running stage 'decontaminate'" in out and "Running stage 'tokenize'" in out
    changed = stages_in_status(project.dvc("status").stdout)
    assert changed == {"pairs", "reference", "train", "merge", "evaluate_base_heldout", "evaluate"}


def test_length_limit_reruns_tokenize_not_prepare(clone):
    project = clone("status-length")
    project.set_params({"data.max_length": 300})
    changed = stages_in_status(project.dvc("status").stdout)
    # The limits are tokenize's (and the trainer's max_length): prepare does not read them, nor does the
    # reference (it scores ids tokenize already cut to the limits).
    assert changed == {"validate", "tokenize", "train"}
    dry = project.dvc("repro", "--dry").stdout
    assert "Running stage 'prepare'" not in dry and "Running stage 'tokenize'" in dry


def test_eval_param_leaves_upstream_stages_up_to_date(clone):
    """A sample-generation setting re-runs the stages that make samples, not the held-out scoring."""
    project = clone("status-eval")
    project.set_params({"eval.max_new_tokens": 4})
    changed = stages_in_status(project.dvc("status").stdout)
    assert changed == {"validate", "evaluate_base", "evaluate"}
    dry = project.dvc("repro", "--dry").stdout
    would_run = set(re.findall(r"Running stage '([\w-]+)'", dry))
    assert would_run == {"validate", "evaluate_base", "evaluate"}


def test_batch_shape_with_the_same_global_batch_never_rescores(clone):
    """Half the micro-batch, twice the accumulation: the pairs stage re-runs and writes a byte-identical
    selection (same pairs, same order), so DVC skips the reference forward and re-runs train."""
    project = clone("status-batch")
    params = project.params()["train"]
    project.set_params(
        {
            "train.per_device_train_batch_size": params["per_device_train_batch_size"] // 2,
            "train.gradient_accumulation_steps": params["gradient_accumulation_steps"] * 2,
        }
    )
    assert stages_in_status(project.dvc("status").stdout) == {"validate", "pairs", "train"}
    out = project.dvc("repro").stdout
    assert "Running stage 'pairs'" in out and "Running stage 'train'" in out
    assert "Stage 'reference' didn't change, skipping" in out
    assert (
        project.read_json("metrics/pairs.json")["selected_train"]
        == project.read_json("metrics/pairs.json")["pairs_needed"]
    )


def test_reading_the_scores_another_way_rescores_nothing(clone):
    """Issue 16: a significance level, a tolerance or a published figure is the report stage's alone."""
    project = clone("status-report")
    project.set_params({"report.significance_level": 0.01, "report.calibration_tolerance": 0.05})
    assert stages_in_status(project.dvc("status").stdout) == {"validate", "report"}
    out = project.dvc("repro").stdout
    ran = set(re.findall(r"Running stage '([\w-]+)'", out))
    assert ran == {"validate", "report"}, out
    assert project.read_json("metrics/eval.json")["meta"]["significance_level"] == 0.01


def test_the_decontamination_switch_retokenizes_and_retrains_but_never_reprepares(clone):
    project = clone("status-decontaminate")
    project.set_params({"decontamination.drop": True})
    assert stages_in_status(project.dvc("status").stdout) == {"validate", "decontaminate"}
    dry = project.dvc("repro", "--dry").stdout
    assert "Running stage 'prepare'" not in dry and "Running stage 'decontaminate'" in dry
