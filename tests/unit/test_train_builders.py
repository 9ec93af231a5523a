"""Pure builders of the train and reference stages: no model, no training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dpo_pipeline import layout, lineage
from dpo_pipeline.data import tables, tokens
from dpo_pipeline.models import loading
from dpo_pipeline.train import dpo, launch, pairs
from dpo_pipeline.train import reference as reference_lib
from tests.conftest import replace_params


def test_bnb_config(default_params):
    import torch

    config = loading.bnb_config(default_params.train)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == default_params.train.bnb_4bit_quant_type
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert config.bnb_4bit_use_double_quant is default_params.train.bnb_4bit_use_double_quant

    other = replace_params(
        default_params,
        train={
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_use_double_quant": False,
        },
    )
    config = loading.bnb_config(other.train)
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_use_double_quant is False
    assert loading.bnb_config(replace_params(default_params, train={"load_in_4bit": False}).train) is None


def test_lora_config(default_params):

    lora = replace_params(
        default_params, train={"lora": {"r": 8, "alpha": 32, "dropout": 0.1, "bias": "lora_only"}}
    ).train.lora
    config = loading.lora_config(lora)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 32, 0.1, "lora_only")
    assert config.target_modules == set(default_params.train.lora.target_modules)
    assert config.task_type == "CAUSAL_LM"


def test_dpo_config_takes_every_knob_from_params(default_params, tmp_path):

    p = replace_params(
        default_params,
        seed=7,
        data={"max_length": 300},
        train={
            "beta": 0.25,
            "loss_type": "ipo",
            "learning_rate": 1.0e-4,
            "lr_scheduler_type": "linear",
            "warmup_steps": 3,
            "max_steps": 11,
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
            "optim": "adamw_torch",
            "save_steps": 5,
            "logging_steps": 2,
            "precompute_ref": False,
            "group_by_length": False,
        },
    )
    config = dpo.dpo_config(p, tmp_path / "ckpt")
    assert config.output_dir == str(tmp_path / "ckpt")
    assert config.beta == 0.25 and config.loss_type == ["ipo"]
    assert config.learning_rate == 1.0e-4 and config.lr_scheduler_type == "linear"
    assert config.warmup_steps == 3 and config.max_steps == 11
    assert config.per_device_train_batch_size == 3 and config.per_device_eval_batch_size == 3
    assert config.gradient_accumulation_steps == 2 and config.gradient_checkpointing is True
    assert config.optim == "adamw_torch"
    assert (config.bf16, config.fp16, config.use_cpu) == (False, False, True)
    assert config.seed == 7 and config.data_seed == 7 and config.max_length == 300
    assert config.save_steps == 5 and config.logging_steps == 2 and config.save_total_limit == 2
    assert config.precompute_ref_log_probs is False
    # The pairs stage decides the order (length-grouped or not); the trainer reads it front to back.
    assert config.train_sampling_strategy == "sequential"
    assert config.disable_dropout is False, "the LoRA dropout of params.yaml must stay active"
    assert config.report_to == [] or config.report_to == "none"

    grouped = dpo.dpo_config(
        replace_params(p, train={"group_by_length": True, "precompute_ref": True}), tmp_path
    )
    assert grouped.train_sampling_strategy == "sequential"
    assert grouped.precompute_ref_log_probs is True


def test_precision_flags(default_params):

    assert (
        loading.precision_kwargs(replace_params(default_params, train={"precision": "bf16"}).train)["bf16"]
        is True
    )
    flags = loading.precision_kwargs(
        replace_params(default_params, train={"precision": "fp16", "device": "cuda"}).train
    )
    assert flags == {"bf16": False, "fp16": True, "use_cpu": False}
    assert loading.model_dtype("bf16") == "bfloat16" and loading.model_dtype("fp32") == "float32"


def test_reference_config_reads_only_declared_params(default_params, tmp_path):
    from trl import DPOConfig

    p = replace_params(default_params, train={"per_device_train_batch_size": 3, "beta": 0.9, "max_steps": 5})
    config = reference_lib.reference_config(p, tmp_path)
    defaults = {name: field.default for name, field in DPOConfig.__dataclass_fields__.items()}
    assert config.precompute_ref_log_probs is True
    # No length limit (tokenize already applied it: trl must cut nothing) and no seed (not a reference param).
    assert config.max_length is None and config.seed == defaults["seed"]
    # Batch size, beta and steps are not reference params: trl's defaults, whatever train uses.
    assert config.per_device_train_batch_size == defaults["per_device_train_batch_size"]
    assert config.beta == defaults["beta"] and config.max_steps == defaults["max_steps"]


def test_checkpoint_key(default_params):

    inputs = {"base": "a" * 64, "prepared": "b" * 64, "reference": "c" * 64}
    key = dpo.checkpoint_key(default_params, inputs)
    assert key == dpo.checkpoint_key(default_params, dict(reversed(list(inputs.items()))))
    assert key != dpo.checkpoint_key(replace_params(default_params, train={"beta": 0.2}), inputs)
    assert key != dpo.checkpoint_key(replace_params(default_params, seed=1), inputs)
    assert key != dpo.checkpoint_key(default_params, {**inputs, "prepared": "d" * 64})
    # Params train does not read cannot make a checkpoint incompatible.
    assert key == dpo.checkpoint_key(replace_params(default_params, eval={"batch_size": 1}), inputs)


def test_latest_checkpoint_skips_incomplete(tmp_path):

    assert dpo.latest_checkpoint(tmp_path / "none") is None
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-12").mkdir()  # killed before its trainer state was written
    (tmp_path / "checkpoint-14").mkdir()
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    (tmp_path / "checkpoint-x").mkdir()
    assert dpo.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_history_rows_and_csv():

    log = [
        {"loss": 0.69, "rewards/margins": 0.0, "learning_rate": 1e-4, "step": 1, "epoch": 0.1},
        {"loss": 0.60, "rewards/margins": 0.3, "rewards/accuracies": 0.75, "learning_rate": 2e-4, "step": 2},
        {"eval_loss": 0.5, "step": 2},
        {"train_runtime": 1.0, "train_loss": 0.65, "step": 2},
    ]
    rows = dpo.history_rows(log)
    assert [r["step"] for r in rows] == [1, 2]
    assert list(rows[0]) == list(dpo.HISTORY_COLUMNS)
    text = dpo.history_csv(rows)
    assert text.splitlines()[0] == ",".join(dpo.HISTORY_COLUMNS)
    assert text.splitlines()[2] == "2,0.6,,,0.3,0.75,0.0002"


def test_collapse_rule():

    collapsed = {"loss": 0.001, "rewards/accuracies": 1.0}
    assert dpo.is_collapse(collapsed, step=10, max_steps=120)
    assert not dpo.is_collapse(collapsed, step=13, max_steps=120), "only early in training"
    assert not dpo.is_collapse({"loss": 0.02, "rewards/accuracies": 1.0}, step=5, max_steps=120)
    assert not dpo.is_collapse({"loss": 0.001, "rewards/accuracies": 0.9}, step=5, max_steps=120)
    assert not dpo.is_collapse({"eval_loss": 0.001}, step=5, max_steps=120)
    assert dpo.is_collapse(collapsed, step=1, max_steps=4), "at least the first step counts"


def test_collapse_callback_warns_and_tags(monkeypatch, caplog):
    from dpo_pipeline import tracking

    tags = {}
    monkeypatch.setattr(tracking, "set_tags", tags.update)
    callback = dpo.collapse_callback(max_steps=100)
    callback.on_log(None, SimpleNamespace(global_step=5), None, logs={"loss": 0.5, "rewards/accuracies": 1.0})
    assert tags == {}
    callback.on_log(
        None, SimpleNamespace(global_step=10), None, logs={"loss": 0.004, "rewards/accuracies": 1.0}
    )
    assert tags == {"collapse_warning": "true", "collapse_step": 10}
    assert "collapse warning" in caplog.text


def tokenized_table(ids):
    import pyarrow as pa

    n = len(ids)
    ids32 = pa.list_(pa.int32())
    return pa.table(
        {
            "id": ids,
            "prompt_ids": pa.array([[1] * (10 + i) for i in range(n)], ids32),
            "chosen_ids": pa.array([[2, 3, 4]] * n, ids32),
            "rejected_ids": pa.array([[5, 6, 7, 8, 9]] * n, ids32),
            "length": pa.array([15 + i for i in range(n)], pa.int32()),
        }
    )


def test_attach_reference_joins_by_id_in_tokenized_order():
    import pyarrow as pa

    from dpo_pipeline.errors import StageError

    table = tokenized_table(["b", "a", "c"])
    reference = pa.table(
        {
            "id": ["a", "b", "c"],
            "ref_chosen_logps": [-1.0, -2.0, -3.0],
            "ref_rejected_logps": [-4.0, -5.0, -6.0],
        }
    )
    joined = reference_lib.attach_reference(table, reference, "ref/train.parquet")
    assert joined.column("id").to_pylist() == ["b", "a", "c"]
    assert joined.column("ref_chosen_logps").to_pylist() == [-2.0, -1.0, -3.0]
    assert joined.schema.field("ref_rejected_logps").type == pa.float32()

    with pytest.raises(StageError, match=r"ref/train\.parquet: no reference log-probs for 1 .* id 'c'"):
        reference_lib.attach_reference(table, reference.slice(0, 2), "ref/train.parquet")


def test_to_dataset():
    import pyarrow as pa

    table = tokenized_table(["a", "b"]).append_column(
        "ref_chosen_logps", pa.array([-1.0, -2.0], pa.float32())
    )
    dataset = pairs.to_dataset(table, ("ref_chosen_logps",))
    assert dataset.column_names == [
        "id",
        "prompt_ids",
        "chosen_ids",
        "rejected_ids",
        "length",
        "ref_chosen_logps",
    ]
    assert dataset[1]["prompt_ids"] == [1] * 11 and dataset[0]["rejected_ids"] == [5, 6, 7, 8, 9]
    assert list(dataset[tokens.LENGTH_COLUMN]) == [15, 16]
    assert pairs.to_dataset(table).column_names == list(layout.TOKENIZED_COLUMNS)


def test_read_tokenized_errors(tmp_path):
    import pyarrow.parquet as pq

    from dpo_pipeline.errors import StageError

    with pytest.raises(StageError, match=r"train\.parquet: tokenized split not found .*dvc repro tokenize"):
        tables.read_tokenized(tmp_path, "train")
    pq.write_table(tokenized_table(["a", "b"]).drop_columns(["chosen_ids"]), tmp_path / "train.parquet")
    with pytest.raises(StageError, match=r"train\.parquet: missing column\(s\) chosen_ids"):
        tables.read_tokenized(tmp_path, "train")
    pq.write_table(tokenized_table(["a", "a"]), tmp_path / "train.parquet")
    with pytest.raises(StageError, match="duplicate"):
        tables.read_tokenized(tmp_path, "train")
    pq.write_table(tokenized_table([]), tmp_path / "train.parquet")
    with pytest.raises(StageError, match=r"train\.parquet: no rows"):
        tables.read_tokenized(tmp_path, "train")


def test_read_reference_checks_meta(tmp_path):
    from dpo_pipeline.errors import StageError

    with pytest.raises(StageError, match="meta.json: not found"):
        reference_lib.read_reference(tmp_path, "train", {})
    (tmp_path / "meta.json").write_text(
        json.dumps({"computed": True, "precompute_ref": True, "base_hash": "old"})
    )
    with pytest.raises(StageError, match="meta.json: base_hash is 'old', this run expects 'new'"):
        reference_lib.read_reference(tmp_path, "train", {"base_hash": "new"})


def test_last_step_is_always_logged():
    from transformers import TrainerControl

    callback = dpo.collapse_callback(max_steps=7)
    control = TrainerControl()
    callback.on_step_end(None, SimpleNamespace(global_step=6, max_steps=7), control)
    assert not control.should_log
    callback.on_step_end(None, SimpleNamespace(global_step=7, max_steps=7), control)
    assert control.should_log


def test_recipe_builders(repo_root):
    """The 7B recipe goes through the same builders: QLoRA NF4 with bf16 compute."""
    import torch

    from dpo_pipeline import config

    recipe = config.load(repo_root / "recipes" / "neuralhermes-2.5.yaml")
    bnb = loading.bnb_config(recipe.train)
    assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert loading.lora_config(recipe.train.lora).r == 16
    assert loading.precision_kwargs(recipe.train) == {"bf16": True, "fp16": False, "use_cpu": False}


@pytest.mark.gpu
def test_recipe_dpo_config_on_cuda(repo_root, tmp_path):
    from dpo_pipeline import config

    recipe = config.load(repo_root / "recipes" / "neuralhermes-2.5.yaml")
    args = dpo.dpo_config(recipe, tmp_path)
    assert args.optim == "paged_adamw_32bit" and args.bf16 and args.gradient_checkpointing
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16


def test_dpo_config_tells_ddp_every_lora_weight_is_used(default_params, tmp_path):

    assert dpo.dpo_config(default_params, tmp_path).ddp_find_unused_parameters is False


def one_node(port: int):
    return launch.Placement(0, 1, "127.0.0.1", port, "one node")


def test_launch_command_cpu_is_torchrun(default_params):
    import torch.distributed.run as torchrun

    params = replace_params(default_params, train={"num_processes": 3, "device": "cpu"})
    argv = launch.launch_command(params, one_node(29123), python="/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    # Parsed by torchrun's own parser, so a renamed or misspelt flag fails here.
    args = torchrun.get_args_parser().parse_args(argv[3:])
    assert (args.nnodes, args.nproc_per_node) == ("1", "3")
    assert (args.master_addr, args.master_port) == ("127.0.0.1", 29123)
    assert args.module and args.training_script == "stages.train" and args.training_script_args == []


def test_launch_command_cpu_on_two_nodes_is_static_torchrun(default_params):
    import torch.distributed.run as torchrun

    params = replace_params(default_params, train={"num_processes": 2, "num_nodes": 2, "device": "cpu"})
    where = launch.Placement(1, 2, "10.0.0.5", 29501, "NODE_RANK/MASTER_ADDR")
    args = torchrun.get_args_parser().parse_args(launch.launch_command(params, where, python="py")[3:])
    assert not args.standalone and args.rdzv_backend == "static"
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "2")
    assert (args.master_addr, args.master_port, args.max_restarts) == ("10.0.0.5", 29501, 0)


@pytest.mark.parametrize(("precision", "flag"), [("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_launch_command_cuda_is_accelerate_ddp(default_params, precision, flag):
    from accelerate.commands.launch import launch_command_parser

    params = replace_params(
        default_params, train={"num_processes": 2, "device": "cuda", "precision": precision}
    )
    argv = launch.launch_command(params, one_node(29124), python="py")
    assert argv[:3] == ["py", "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.config_file is None
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (1, 2, flag)
    assert (args.main_process_ip, args.main_process_port) == ("127.0.0.1", 29124)
    assert args.module and args.training_script == "stages.train"


def test_launch_command_cuda_with_an_accelerate_config_file(default_params):
    """FSDP / DeepSpeed: the config file picks the distributed type, so --multi_gpu must not override it."""
    from accelerate.commands.launch import launch_command_parser

    params = replace_params(default_params, train={"num_processes": 4, "device": "cuda", "precision": "bf16"})
    argv = launch.launch_command(params, one_node(1), config_file="fsdp.yaml", python="py")
    args = launch_command_parser().parse_args(argv[3:])
    assert args.config_file == "fsdp.yaml" and not args.multi_gpu
    assert (args.num_processes, args.mixed_precision) == (4, "bf16")


def test_is_distributed_worker():

    assert not launch.is_distributed_worker({"PATH": "/bin", "RANK": "0"})
    assert launch.is_distributed_worker({"LOCAL_RANK": "1"})
    assert launch.is_distributed_worker({"WORLD_SIZE": "2"})


def test_train_summary_holds_declared_params_and_deterministic_metrics(default_params):
    from stages import train

    metrics = {key: float(i) for i, key in enumerate(dpo.METRIC_KEYS)}
    summary = dpo.train_summary(default_params, metrics)
    assert set(summary) == {"params", "metrics"}
    assert summary["params"] == lineage.params_for(default_params, train.SECTIONS)
    assert set(summary["params"]) == {"seed", "data.max_length", "train"}
    assert set(summary["metrics"]) == set(dpo.SUMMARY_METRIC_KEYS) <= set(dpo.METRIC_KEYS)
    for varying in ("train_runtime_s", "pairs_per_s", "tokens_per_s", "peak_memory_mb", "pad_fraction"):
        assert varying not in summary["metrics"]
    assert summary["metrics"]["eval_loss"] == metrics["eval_loss"]
    json.dumps(summary, allow_nan=False)
