"""Launch commands and node placement (issue 28): what the train and reference stages pass to torchrun /
accelerate launch, from params and the environment torchrun, Slurm or SkyPilot set; the shipped accelerate
config files load through accelerate's own config classes."""

from __future__ import annotations

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.train import launch
from tests.conftest import REPO, replace_params


def test_the_shipped_accelerate_configs_load_through_accelerate(default_params):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    for method, rel in launch.ACCELERATE_CONFIGS.items():
        if rel is None:
            continue
        config = load_config_from_file(str(REPO / rel))
        assert isinstance(config, ClusterConfig)
        expected = {"fsdp": "FSDP", "zero3": "DEEPSPEED"}[method]
        assert str(config.distributed_type).endswith(expected), (rel, config.distributed_type)
    fsdp = load_config_from_file(str(REPO / launch.ACCELERATE_CONFIGS["fsdp"]))
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter save gathers it whole
    zero3 = load_config_from_file(str(REPO / launch.ACCELERATE_CONFIGS["zero3"]))
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.deepspeed_config["zero3_save_16bit_model"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29999"}, (1, "10.0.0.5", 29999)),
        ({"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.1.0.2\n10.1.0.3\n", "SKYPILOT_NUM_NODES": "2"},
         (1, "10.1.0.2", 29500)),
        ({"SLURM_NODEID": "0", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}, (0, "gpu07", 29500)),
    ],
)  # fmt: skip
def test_placement_from_each_engine(env, expected):
    got = launch.placement(env, 2, 29500)
    assert (got.rank, got.master_addr, got.master_port) == expected and got.nodes == 2


def test_placement_refuses_a_missing_or_mismatched_environment():
    with pytest.raises(StageError, match="set NODE_RANK and MASTER_ADDR"):
        launch.placement({}, 2, 29500)
    with pytest.raises(StageError, match="train.num_nodes is 2 but Slurm says this job has 3 nodes"):
        launch.placement({"SLURM_NODEID": "0", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "a[1-3]"}, 2, 29500)


@pytest.mark.parametrize(
    ("nodelist", "first"), [("gpu[03-05,9],cpu1", "gpu03"), ("node7", "node7"), ("a1,b2", "a1")]
)
def test_first_slurm_host(nodelist, first):
    assert launch.first_slurm_host(nodelist) == first


def test_gpu_launch_command_for_node_one_of_two_with_fsdp(default_params):
    params = replace_params(
        default_params,
        train={"device": "cuda", "num_processes": 4, "num_nodes": 2, "distributed": "fsdp", "precision": "bf16",
               "bnb_4bit_compute_dtype": "bfloat16", "optim": "adamw_torch"},
    )  # fmt: skip
    where = launch.Placement(1, 2, "10.0.0.5", 29501, "test")
    config = launch.accelerate_config(params, {}, REPO)
    argv = launch.launch_command(params, where, config, python="python")
    text = " ".join(argv)
    assert f"--config_file {REPO / 'configs/accelerate/fsdp2_qlora.yaml'}" in text
    assert "--num_machines 2 --machine_rank 1 --num_processes 8 --mixed_precision bf16" in text
    assert "--main_process_ip 10.0.0.5 --main_process_port 29501 --rdzv_backend static" in text
    with pytest.raises(StageError, match="unset one of the two"):
        launch.accelerate_config(params, {"ACCELERATE_CONFIG_FILE": "mine.yaml"}, REPO)


def test_the_worker_pulls_exactly_the_train_inputs_other_stages_write():
    import yaml

    from tools.train_worker import train_inputs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    got = train_inputs(REPO / "dvc.yaml")
    assert got == [d for d in stages["train"]["deps"] if not d.endswith(".py")]
    assert {"models/base", "data/tokenized", "data/reference", "data/pairs/selected.parquet"} <= set(got)


def test_a_pair_scored_twice_or_dropped_by_the_reference_processes_fails_the_run():
    import pyarrow as pa

    from dpo_pipeline.train.reference import require_each_pair_once

    require_each_pair_once(pa.chunked_array([["a", "b"], ["c"]]), 3, "train.parquet")  # each once: fine
    with pytest.raises(StageError, match=r"returned 3 rows for 3 pairs \(1 pair\(s\) scored more than once"):
        require_each_pair_once(pa.chunked_array([["a", "b", "b"]]), 3, "train.parquet")
    with pytest.raises(StageError, match=r"train.parquet: the reference pass returned 2 rows for 3 pairs"):
        require_each_pair_once(pa.chunked_array([["a", "b"]]), 3, "train.parquet")
