"""One device per single-process stage: the placement logic, checked without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpo_pipeline.models.loading import one_visible_gpu, pin_single_device
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, "0"), ("0", "0"), ("2,3", "2"), (" 5 , 6", "5"), ("GPU-1a2b,GPU-3c4d", "GPU-1a2b"), ("", "")],
)
def test_one_visible_gpu_is_the_first_the_user_made_visible(visible, expected):
    assert one_visible_gpu(visible) == expected


def test_pin_leaves_cpu_stages_and_distributed_workers_alone():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert pin_single_device("cpu", env) is None and env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    worker = {"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_RANK": "1"}  # torchrun / accelerate: GPU LOCAL_RANK
    assert pin_single_device("cuda", worker) is None and worker["CUDA_VISIBLE_DEVICES"] == "0,1"
    for device in ("cuda", "auto"):
        env = {"CUDA_VISIBLE_DEVICES": "4,5"}
        assert pin_single_device(device, env) == "4" and env["CUDA_VISIBLE_DEVICES"] == "4"
    unset: dict[str, str] = {}
    assert pin_single_device("cuda", unset) == "0"


@pytest.mark.parametrize(
    ("module", "key"),
    [
        ("stages.reference", "train.device"),
        ("stages.merge", "merge.device"),
        ("stages.evaluate", "eval.device"),
    ],
)
def test_single_process_stage_mains_pin_before_any_cuda_call(module, key, tmp_path):
    """Each single-process stage's main() pins one GPU before run(): checked by running main() with run()
    replaced, on a copy of params.yaml whose device is cuda, with four GPUs 'visible'."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section, name = key.split(".")
    params[section][name] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["evaluate_base"] if module == "stages.evaluate" else []
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x', *{argv!r}]\n"
        f"import {module} as m\n"
        "m.run = lambda *a, **k: print('VISIBLE=' + os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "m.main()\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "3,1,2,0", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert "VISIBLE=3" in result.stdout, result.stdout + result.stderr[-2000:]


def test_train_pins_only_with_one_process(tmp_path):
    import yaml

    for processes, expected in ((1, "VISIBLE=3"), (2, "LAUNCH")):
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["train"].update(device="cuda", num_processes=processes)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        code = (
            "import os, sys\n"
            f"sys.path.insert(0, {str(REPO)!r}); sys.argv = ['x']\n"
            "import stages.train as m\n"
            "m.run = lambda *a, **k: print('VISIBLE=' + os.environ['CUDA_VISIBLE_DEVICES'])\n"
            "m.launch = lambda p: print('LAUNCH', os.environ['CUDA_VISIBLE_DEVICES']) or 0\n"
            "m.main()\n"
        )
        env = {"CUDA_VISIBLE_DEVICES": "3,1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert expected in result.stdout, result.stdout + result.stderr[-2000:]
        if processes > 1:
            assert "LAUNCH 3,1" in result.stdout  # every worker sees all the GPUs and takes GPU LOCAL_RANK
