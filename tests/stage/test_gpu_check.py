"""make gpu-check's CPU dry run: the GPU check's whole path (tokenize -> pairs -> reference -> train -> merge ->
evaluate on the recipe's settings, the real tokenizer) runs here and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_dry_run_passes_and_reports_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["dry_run"] is True and figures["steps"] == 2
    assert set(figures["peak_memory_gib"]) == {"reference", "train", "merge", "evaluate"}
    assert figures["pairs"]["pairs_needed"] == 2 * 2  # 2 steps x 2 pairs (the dry run's batch)
    assert figures["reference_pairs"] == figures["pairs"]["selected_train"] + figures["pairs"]["eval_pairs"]
    assert figures["merge_fidelity_max_abs"] < 0.1
    assert 0.0 <= figures["heldout_acc_norm"] <= 1.0
    assert figures["median_step_s"] > 0 and figures["projected_200_steps_min"] > 0
    assert figures["fsdp_world_size_1"].startswith("skipped on the CPU: accelerate enables FSDP only")
    assert "gpu-check: wrote" in result.stdout
