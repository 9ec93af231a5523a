"""dpo_pipeline.runner: one set-up of every stage's output (issue 14): log lines, not progress-bar walls, in a
log file; the known bitsandbytes noise dropped and everything else kept; a clean error line and exit 1."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

STAGE_LIKE = """
import logging, sys
sys.path.insert(0, {repo!r})
from dpo_pipeline.runner import run_main
from dpo_pipeline.errors import StageError

def work():
    from tqdm import tqdm
    for _ in tqdm(range(200), desc="long step"):
        pass
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
    bnb.warning("a real bitsandbytes problem")
    logging.getLogger("stages.demo").info("step done")
    raise StageError("data/x.parquet: bad row 3")

run_main(work)
"""


def test_a_stage_logged_to_a_file_gets_lines_no_bars_no_known_noise(tmp_path):
    log = tmp_path / "stage.log"
    with open(log, "w") as handle:  # stderr is a file, as under `dvc repro > log` or in CI
        result = subprocess.run(
            [sys.executable, "-c", STAGE_LIKE.format(repo=str(REPO))],
            stderr=handle,
            stdout=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},
            check=False,
        )
    text = log.read_text()
    assert result.returncode == 1
    assert text.splitlines()[-1] == "error: data/x.parquet: bad row 3"
    assert "stages.demo: step done" in text
    assert "bitsandbytes.backends.cpu.ops: a real bitsandbytes problem" in text
    assert "kernels-community" not in text
    assert "\r" not in text and "long step" not in text
