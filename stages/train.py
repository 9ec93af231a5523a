"""train stage: QLoRA DPO of the base model on the tokenized preference pairs.

Reads: params `seed`, `data.max_length`, `train`; models/base/ (model + ChatML tokenizer);
data/tokenized/{train,test}.parquet (the token ids of the prepared pairs, written by stages/tokenize.py and
handed to trl as they are: this stage never tokenizes); data/pairs/ (which pairs, in which order: written by
stages/pairs.py; the trainer reads the training pairs front to back in that order, the held-out subset for
eval_*); data/reference/ (cached reference log-probs of exactly those pairs, written by stages/reference.py,
used when `train.precompute_ref` is true).
Writes: models/adapter/ (PEFT adapter as adapter_model.safetensors + adapter_config.json, and the tokenizer),
metrics/train.json (flat final metrics), metrics/train_history.csv (one row per logging step, for DVC plots).

metrics/train.json: train_loss and rewards_* are the last logged training values (trl's means over the
last logging window); eval_* come from trainer.evaluate on the held-out test split after training
(eval_rewards_accuracies: share of test pairs whose chosen reward beats the rejected one); pairs_per_s and
tokens_per_s count what was trained on (tokens: non-pad tokens of both prompt+answer sequences);
pad_fraction is the share of pad tokens in those batches; peak_memory_mb is the process's peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU (with several processes: counts summed, memory the largest process's).
Scratch: .scratch/checkpoints/train/<fingerprint>/ holds checkpoints every `train.save_steps`; a later run
with the same params and inputs resumes from the last complete one, and a finished run deletes them.

The frozen base is loaded once (4-bit NF4 through bitsandbytes when `train.load_in_4bit`), LoRA is added by
trl's DPOTrainer from `peft_config`, and the reference model is that same base with the adapter disabled.
models/adapter/train_summary.json (read by the merge stage's model card) holds the declared params and the
deterministic metrics only (losses, rewards, steps: no runtime, throughput or memory), so identical runs give
a byte-identical adapter folder.

Several processes (`train.num_processes` > 1): `python -m stages.train` re-launches itself as that many
workers and exits with their exit code (see `launch_command`). On the CPU (`train.device: cpu`) the launcher
is torchrun (`python -m torch.distributed.run`, gloo backend; `accelerate launch --cpu` started only one
process here); on CUDA it is `accelerate launch --multi_gpu` (DDP, one GPU per process, `--mixed_precision`
from `train.precision`). Each worker takes its own micro-batches of per_device_train_batch_size pairs, so
the global batch is per_device_train_batch_size * num_processes * gradient_accumulation_steps. Only rank 0 opens the MLflow run
and writes models/adapter, the metrics and the history; throughput counts are summed over the processes.
DDP takes the 4-bit base and the LoRA layers as they are (checked with gloo on the CPU, with and without
gradient checkpointing): only the LoRA weights require gradients and get synchronized, and the ranks end with
identical adapters. `ddp_find_unused_parameters` is False because every LoRA weight is used in every step;
the Trainer's default for a PEFT model (True) works too but searches the graph for unused weights each step.

FSDP or DeepSpeed on several GPUs: write an accelerate config file (`accelerate config`, or a YAML with
`distributed_type: FSDP` / `DEEPSPEED` and its `fsdp_config` / `deepspeed_config`) and point
ACCELERATE_CONFIG_FILE at it; the stage then runs `accelerate launch --config_file $ACCELERATE_CONFIG_FILE`
without `--multi_gpu`, so the file picks the distributed type, while `--num_processes` and
`--mixed_precision` still come from params. The file changes how the work is spread, not what is computed,
so it is not a DVC param. Only DDP is tested (on the CPU with gloo): a 4-bit 7B fits on one GPU, which DDP
needs; sharding the 4-bit weights with FSDP / ZeRO-3 additionally needs bitsandbytes' `bnb_4bit_quant_storage`
set to the compute dtype and a sharded save of the adapter, which this stage does not do.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.common import (
    ADAPTER_DIR,
    BASE_DIR,
    METRICS_DIR,
    PAIRS_DIR,
    REFERENCE_DIR,
    SCRATCH_DIR,
    TOKENIZED_DIR,
    StageError,
    atomic_dir,
    atomic_write_bytes,
    load_model,
    load_tokenizer,
    pin_single_device,
    require_safetensors,
    resolve_device,
    sha256_bytes,
    sha256_tree,
    template_hash,
    torch_dtype,
    write_json,
)
from stages.tokenize import IDS_COLUMNS, LENGTH_COLUMN, OUTPUT_COLUMNS, read_tokenized

logger = logging.getLogger("stages.train")

# The params this stage declares in dvc.yaml (also the MLflow params and the checkpoint fingerprint).
SECTIONS = ["seed", "data.max_length", "train"]
SPLITS = ("train", "test")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
HISTORY_COLUMNS = (
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "learning_rate",
)
# Metrics that differ between identical runs: timings, throughput, memory, and pad_fraction, which a
# resumed run counts over its own steps only.
RUN_DEPENDENT_KEYS = ("train_runtime_s", "pairs_per_s", "tokens_per_s", "pad_fraction", "peak_memory_mb")
METRIC_KEYS = (
    "train_loss",
    "rewards_chosen",
    "rewards_rejected",
    "rewards_margins",
    "rewards_accuracies",
    "eval_loss",
    "eval_rewards_accuracies",
    "eval_rewards_margins",
    "train_steps",
    *RUN_DEPENDENT_KEYS,
)
# The metrics that are the same on every identical run: what train_summary.json carries.
SUMMARY_METRIC_KEYS = tuple(key for key in METRIC_KEYS if key not in RUN_DEPENDENT_KEYS)
TRAIN_SUMMARY = "train_summary.json"  # in models/adapter; stages/merge.py reads it for the model card
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> accelerate's flag
COLLAPSE_LOSS = 0.01  # loss below this with reward accuracy pinned at 1.0 ...
COLLAPSE_EARLY_FRACTION = 0.1  # ... within this share of max_steps: the preference was learnt too easily


# ---------------------------------------------------------------------------------------------------------
# Pure builders


def model_dtype(precision: str) -> str:
    """The dtype the unquantized parts of the base are loaded in, from `train.precision`."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def bnb_config(t: Any):
    """BitsAndBytesConfig for the frozen base (None when `train.load_in_4bit` is false)."""
    if not t.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=t.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=torch_dtype(t.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=t.bnb_4bit_use_double_quant,
    )


def lora_config(lora: Any):
    """peft LoraConfig from `train.lora`."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def precision_kwargs(t: Any) -> dict[str, Any]:
    """Trainer precision and device flags shared by the train and reference stages."""
    return {
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "use_cpu": resolve_device(t.device) == "cpu",
    }


def dpo_config(p: Any, out_dir: str | Path):
    """trl DPOConfig with every knob from params; `out_dir` receives the checkpoints."""
    from trl import DPOConfig

    t = p.train
    return DPOConfig(
        output_dir=str(out_dir),
        beta=t.beta,
        loss_type=[t.loss_type],
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        optim=t.optim,
        **precision_kwargs(t),
        seed=p.seed,
        data_seed=p.seed,
        max_length=p.data.max_length,
        precompute_ref_log_probs=t.precompute_ref,
        # The pairs stage decided the order (seeded epochs, length-grouped when train.group_by_length) and the
        # training dataset is already in it: the trainer reads it front to back.
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=t.save_steps,
        # Only the last checkpoint is needed to resume; older ones are rotated away as new ones land.
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        # Show NaN/inf in the logs as they are; the NaN guard stops training anyway.
        logging_nan_inf_filter=False,
        eval_strategy="no",
        # trl's default (True) would also switch off the LoRA dropout, leaving `train.lora.dropout` inert.
        # The builtin Mistral config has no other dropout (attention_dropout 0.0).
        disable_dropout=False,
        # The MLflow callback is added explicitly (tracking.mlflow_callback) so it logs into the stage's run
        # and a tracking failure cannot stop training.
        report_to="none",
        run_name="train",
        dataloader_num_workers=0,
        # Only used with several processes (DDP): every LoRA weight takes part in every step, so DDP need not
        # search the graph for unused ones each step (the Trainer's default for a PEFT model would).
        ddp_find_unused_parameters=False,
    )


def load_base(base_dir: str | Path, t: Any):
    """The base as `train.*` loads it: dtype, 4-bit through bitsandbytes when `train.load_in_4bit`, device.

    No k-bit training preparation (see load_policy); bench's article-style ref_model is this alone.
    """
    device = resolve_device(t.device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(model_dtype(t.precision))}
    quantization = bnb_config(t)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        # One whole model per process: under DDP, worker LOCAL_RANK owns GPU LOCAL_RANK.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank} if device == "cuda" else {"": "cpu"}
    model = load_model(base_dir, **kwargs)
    model.config.use_cache = False
    if quantization is not None:
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # On CPUs with AVX512-BF16, bitsandbytes repacks the weights on the first no-grad eval-mode
                # forward and from then on multiplies in bf16: the reference log-probs would then depend on
                # whether they were computed in eval mode (reference stage, evaluation) or train mode (on the
                # fly), and the repacking fails for layers narrower than its 64-wide blocks. One path for all.
                module.support_avx512bf16_for_cpu = False
    return model


def load_policy(base_dir: str | Path, t: Any):
    """The frozen base for QLoRA: load_base, then k-bit preparation when it is 4-bit.

    The reference stage loads the base through this same function, so cached and on-the-fly reference
    log-probs come from the same weights and dtypes.
    """
    from peft import prepare_model_for_kbit_training

    model = load_base(base_dir, t)
    if bnb_config(t) is not None:
        # Gradient checkpointing is switched on by the Trainer from `train.gradient_checkpointing`, not here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def checkpoint_key(params: Any, input_hashes: dict[str, str]) -> str:
    """Fingerprint of everything a checkpoint depends on: the declared params and the input hashes.

    A resume only ever picks up a checkpoint written with the same key, i.e. a compatible run.
    """
    from stages import tracking

    payload = {"params": tracking.params_for(params, SECTIONS), "inputs": dict(sorted(input_hashes.items()))}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())[:16]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder (its trainer_state.json, written last, parses)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    for path in run_dir.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if not (path.is_dir() and step.isdigit()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # killed while writing this checkpoint
        found.append((int(step), path))
    return max(found)[1] if found else None


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per training logging step (eval and summary entries skipped), HISTORY_COLUMNS only."""
    rows = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        rows.append({col: entry.get(col, "") for col in HISTORY_COLUMNS})
    return rows


def history_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(HISTORY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def is_collapse(logs: dict[str, Any], step: int, max_steps: int) -> bool:
    """Loss near 0 with reward accuracy pinned at 1.0 early in training."""
    early = step <= max(1, math.ceil(COLLAPSE_EARLY_FRACTION * max_steps))
    loss, accuracy = logs.get("loss"), logs.get("rewards/accuracies")
    return early and loss is not None and accuracy is not None and loss < COLLAPSE_LOSS and accuracy >= 1.0


def train_summary(params: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """models/adapter/train_summary.json: the declared params and the deterministic metrics only."""
    from stages import tracking

    return {
        "params": tracking.params_for(params, SECTIONS),
        "metrics": {key: metrics[key] for key in SUMMARY_METRIC_KEYS},
    }


# ---------------------------------------------------------------------------------------------------------
# Several processes


def is_distributed_worker(env: Mapping[str, str]) -> bool:
    """True inside a process started by torchrun / accelerate launch (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


def launch_command(
    params: Any, port: int, config_file: str | None = None, python: str = sys.executable
) -> list[str]:
    """argv that runs this stage as `train.num_processes` workers on one machine.

    CPU: torchrun (gloo). CUDA: accelerate launch, DDP unless `config_file` (an accelerate config file,
    e.g. FSDP or DeepSpeed) says otherwise. `port` is the rendezvous port on 127.0.0.1.
    """
    t = params.train
    n = str(t.num_processes)
    if resolve_device(t.device) == "cpu":
        return [
            python, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", n,
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "stages.train",
        ]  # fmt: skip
    distribution = (
        ["--config_file", config_file] if config_file else ["--multi_gpu", "--dynamo_backend", "no"]
    )
    return [
        python, "-m", "accelerate.commands.launch",
        *distribution,
        "--num_machines", "1", "--num_processes", n,
        "--mixed_precision", MIXED_PRECISION[t.precision],
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "-m", "stages.train",
    ]  # fmt: skip


def _prepare_tracking_store(params: Any) -> None:
    """Check the tracking server and create the store and experiment once, before the workers start.

    An unreachable server then stops the stage before N processes load models. And rank 0 does not run MLflow's
    database migrations while a worker that failed on bad input gets it stopped (torchrun stops the remaining
    workers when one fails), which could leave a half-migrated SQLite store behind.
    """
    import mlflow

    from stages import tracking

    uri = tracking.resolve_uri(params.tracking.on_unreachable)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(params.tracking.experiment)
    except Exception:  # noqa: BLE001 - rank 0's stage_run tries again and reports (or falls back) itself
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(params: Any) -> int:
    """Run the workers and wait for them; returns their launcher's exit code (128 + N when killed by signal N).

    SIGTERM (e.g. from a CI timeout) is passed on to the launcher, which stops the workers; Ctrl-C reaches
    the whole process group by itself, so this process only keeps waiting for the workers to go.
    """
    _prepare_tracking_store(params)
    argv = launch_command(params, free_port(), os.environ.get("ACCELERATE_CONFIG_FILE") or None)
    env = dict(os.environ)
    if resolve_device(params.train.device) == "cpu":
        # torchrun would pin every worker to 1 thread; share the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params.train.num_processes)))
    print(f"train: launching {params.train.num_processes} processes: {' '.join(argv)}", file=sys.stderr)
    child = subprocess.Popen(argv, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        print(
            f"error: the train workers failed (exit code {code}); see their messages above", file=sys.stderr
        )
    return 128 - code if code < 0 else code


# ---------------------------------------------------------------------------------------------------------
# Data


def index_by_id(ids, table) -> tuple[Any, int, str | None]:
    """(row index of each of `ids` in `table`, how many are missing, the first missing id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(list(ids) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids).cast(
        pa.string()
    )
    index = pc.index_in(wanted, value_set=table.column("id").cast(pa.string()))
    first = wanted.filter(pc.is_null(index))[0].as_py() if index.null_count else None
    return index, index.null_count, first


def rows_in_order(table, ids: Sequence[str], path: str | Path):
    """The rows of `table` for `ids`, in that order (an id may repeat: one row per epoch it is trained in)."""
    index, missing, first = index_by_id(ids, table)
    if missing:
        raise StageError(
            f"{path}: {missing} pair(s) of data/pairs are not in the tokenized data, e.g. id {first!r}; "
            "data/pairs is stale (run: dvc repro pairs)"
        )
    return table.take(index)


def attach_reference(table, reference, reference_path: str | Path):
    """Add the cached ref_chosen_logps / ref_rejected_logps to `table` by id, keeping `table`'s row order."""
    missing_columns = [c for c in ("id", *REF_COLUMNS) if c not in reference.column_names]
    if missing_columns:
        raise StageError(f"{reference_path}: missing column(s) {', '.join(missing_columns)}")
    index, missing, first = index_by_id(table.column("id"), reference)
    if missing:
        raise StageError(
            f"{reference_path}: no reference log-probs for {missing} tokenized row(s), e.g. id {first!r}; "
            "the reference is stale (run: dvc repro reference)"
        )
    for name in REF_COLUMNS:
        table = table.append_column(name, reference.column(name).take(index).cast("float32"))
    return table


def to_dataset(table, keep: Sequence[str] = ()):
    """Tokenized rows -> a datasets.Dataset with what trl reads (the ids), the id, the length used by
    length-grouped batching and any `keep` columns (cached reference log-probs)."""
    import pyarrow as pa
    from datasets import Dataset

    return Dataset(pa.table({name: table.column(name) for name in (*OUTPUT_COLUMNS, *keep)}))


def read_reference(reference_dir: str | Path, split: str, expected: dict[str, Any]):
    """The cached reference log-probs of a split, after checking they were made from the same inputs/params."""
    import pyarrow.parquet as pq

    reference_dir = Path(reference_dir)
    meta_path = reference_dir / "meta.json"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: not found (train.precompute_ref is true: run dvc repro reference)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("precompute_ref"):
        raise StageError(
            f"{meta_path}: the reference stage ran with train.precompute_ref false and cached nothing "
            "(run: dvc repro reference)"
        )
    for key, value in expected.items():
        if meta.get(key) != value:
            raise StageError(
                f"{meta_path}: {key} is {meta.get(key)!r}, this run expects {value!r}; the cached reference "
                "log-probs were made from other inputs or params (run: dvc repro reference)"
            )
    path = reference_dir / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path}: not found (run: dvc repro reference)")
    return pq.read_table(path)


# ---------------------------------------------------------------------------------------------------------
# Trainer pieces


def _trainer_class():
    """DPOTrainer plus: cached reference columns, length-grouped batching, the NaN guard, throughput counters."""
    import torch
    from trl import DPOTrainer

    class PipelineDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # The tokenize stage's ids are what trl's own tokenization makes of the prepared strings (checked
            # by a stage test), already within the length limits: trl 1.16 would tokenize them again.
            if all(name in dataset.column_names for name in IDS_COLUMNS):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # trl 1.16 recomputes even when the dataset already carries the columns; use the cached ones.
            if all(c in dataset.column_names for c in REF_COLUMNS):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            # Keep the length column through remove_unused_columns: the length-grouped sampler reads it.
            if LENGTH_COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, LENGTH_COLUMN]

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # peft's load_adapter upcasts the adapter to fp32 (autocast_adapter_dtype), while trl trains the
            # adapter of a 4-bit model in bf16: without this a resumed run would continue in another dtype and
            # end with a different adapter than an uninterrupted one. (Runs before the optimizer is built.)
            dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in self.model.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            self.pipeline_counts["pairs"] += mask.shape[0] // 2
            self.pipeline_counts["tokens"] += int(mask.sum())
            self.pipeline_counts["padded_tokens"] += mask.numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            # Checked on every micro-batch, before the optimizer can apply a NaN update; the Trainer's own
            # logging would only average NaNs away (logging_nan_inf_filter).
            if not torch.isfinite(loss).all():
                raise StageError(
                    f"training loss is {loss.detach().float().cpu().item()} at step {self.state.global_step + 1}: "
                    "training diverged, nothing was published (lower train.learning_rate, check the data)"
                )
            return loss

    return PipelineDPOTrainer


def _collapse_callback(max_steps: int):
    from transformers import TrainerCallback

    class CollapseWatch(TrainerCallback):
        """Flags a suspiciously easy preference: loss ~0 with accuracy 1.0 in the first 10% of steps.
        Also makes sure the last step is logged."""

        def __init__(self):
            self.step: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            # Always log the last step, so the history and the final metrics end where training ended even
            # when max_steps is not a multiple of logging_steps.
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.step is None and logs and is_collapse(logs, state.global_step, max_steps):
                self.step = state.global_step
                logger.warning(
                    "collapse warning: loss %.4g and reward accuracy %.2f at step %d of %d; the preference may "
                    "be trivially separable (e.g. a length or format artifact) or beta/learning rate too high",
                    logs["loss"],
                    logs["rewards/accuracies"],
                    state.global_step,
                    max_steps,
                )
                from stages import tracking

                tracking.set_tags({"collapse_warning": "true", "collapse_step": state.global_step})

    return CollapseWatch()


def rss_peak_mb() -> float:
    """This process's resident-set high-water mark in MiB.

    /proc/self/status VmHWM belongs to this process's own address space and starts afresh at exec.
    ru_maxrss does not: Linux carries it over fork + exec, so under `dvc repro` (or in a bench worker) it
    would report at least the parent's peak. ru_maxrss is only the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mb(device: str) -> float:
    """This process's peak memory in MiB: torch.cuda.max_memory_allocated on CUDA, else rss_peak_mb."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_peak_mb()


def _input_hashes(run: Any, inputs: dict[str, Path]) -> dict[str, str]:
    """sha256 of the inputs: the ones tracking already computed for the run's tags, else computed here."""
    tags = getattr(getattr(run, "data", None), "tags", None) or {}
    out = {}
    for name, path in inputs.items():
        value = tags.get(f"input.{name}.sha256")
        if not value or value == "missing":
            value = sha256_tree(path) if Path(path).exists() else "missing"
        out[name] = value
    return out


def _across_processes(
    accelerator: Any, counts: dict[str, int], peak_mb: float
) -> tuple[dict[str, int], float]:
    """Token/pair counts summed and the peak memory maxed over all processes (a collective: every rank calls)."""
    import torch

    names = sorted(counts)
    local = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    peak = accelerator.gather(torch.tensor([peak_mb], dtype=torch.float64, device=accelerator.device))
    return {n: int(v) for n, v in zip(names, total, strict=True)}, float(peak.max())


def _last(log_history: list[dict[str, Any]], key: str) -> float:
    for entry in reversed(log_history):
        if key in entry and "loss" in entry:
            return float(entry[key])
    return float("nan")


# ---------------------------------------------------------------------------------------------------------
# Stage


def run(
    params: Any,
    base_dir: str | Path = BASE_DIR,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    reference_dir: str | Path = REFERENCE_DIR,
    adapter_dir: str | Path = ADAPTER_DIR,
    metrics_path: str | Path = METRICS_DIR / "train.json",
    history_path: str | Path = METRICS_DIR / "train_history.csv",
    checkpoint_dir: str | Path = SCRATCH_DIR / "checkpoints" / "train",
    extra_callbacks: Sequence[Any] = (),
    pairs_dir: str | Path = PAIRS_DIR,
) -> dict[str, float]:
    """Train the adapter; returns the metrics written to `metrics_path`."""
    from stages import reference as reference_stage
    from stages import tracking

    base_dir, tokenized_dir, reference_dir = Path(base_dir), Path(tokenized_dir), Path(reference_dir)
    t = params.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != t.num_processes:
        raise StageError(
            f"train.num_processes is {t.num_processes} but this process runs in a group of {world_size}: "
            "start the stage with `python -m stages.train`, which launches the processes itself"
        )
    from stages import pairs as pairs_stage

    pairs_dir = Path(pairs_dir)
    inputs = {
        "base": base_dir,
        "tokenized": tokenized_dir,
        "selected": pairs_dir / pairs_stage.SELECTED_FILE,
        "order": pairs_dir / pairs_stage.ORDER_FILE,
        "reference": reference_dir,
    }
    with tracking.stage_run("train", params, sections=SECTIONS, inputs=inputs) as mlflow_run:
        import torch

        require_safetensors(base_dir)  # a clear error before transformers would try the hub with the path
        tokenizer = load_tokenizer(base_dir)
        tracking.set_tags(
            {"chat_template.sha256": template_hash(tokenizer.chat_template), "collapse_warning": "false"}
        )
        hashes = _input_hashes(mlflow_run, inputs)

        datasets = {}
        tokenized = {split: read_tokenized(tokenized_dir, split) for split in SPLITS}
        wanted = pairs_stage.training_ids(pairs_dir)
        for split in SPLITS:
            table = rows_in_order(tokenized[split], wanted[split], tokenized_dir / f"{split}.parquet")
            keep: tuple[str, ...] = ()
            if t.precompute_ref:
                expected = {
                    "base_sha256": hashes["base"],
                    "tokenized_sha256": hashes["tokenized"],
                    "selected_sha256": hashes["selected"],
                    "params": tracking.params_for(params, reference_stage.SECTIONS),
                }
                cached = read_reference(reference_dir, split, expected)
                table = attach_reference(table, cached, reference_dir / f"{split}.parquet")
                keep = REF_COLUMNS
            datasets[split] = to_dataset(table, keep)

        run_dir = Path(checkpoint_dir) / checkpoint_key(params, hashes)
        resume = latest_checkpoint(run_dir)
        tracking.set_tags({"checkpoint_dir": str(run_dir), "resumed_from": str(resume) if resume else ""})
        if resume:
            print(f"train: resuming from {resume}", file=sys.stderr)

        device = resolve_device(t.device)
        model = load_policy(base_dir, t)
        collapse = _collapse_callback(t.max_steps)
        trainer = _trainer_class()(
            model=model,
            args=dpo_config(params, run_dir),
            train_dataset=datasets["train"],
            eval_dataset=datasets["test"],
            processing_class=tokenizer,
            peft_config=lora_config(t.lora),
            callbacks=[tracking.mlflow_callback(), collapse, *extra_callbacks],
        )
        trainer.pipeline_counts = {"pairs": 0, "tokens": 0, "padded_tokens": 0}
        accelerator = trainer.accelerator
        logger.info(
            "process %d of %d (%s, %s)",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.distributed_type.value,
            accelerator.device,
        )

        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = float(output.metrics.get("train_runtime", time.perf_counter() - started))
        bad = [
            n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()
        ]
        if bad:
            raise StageError(f"adapter weight {bad[0]} is not finite after training; nothing was published")

        evaluation = trainer.evaluate()
        history = trainer.state.log_history
        counts, peak_mb = _across_processes(accelerator, trainer.pipeline_counts, peak_memory_mb(device))
        metrics = {
            "train_loss": _last(history, "loss"),
            "rewards_chosen": _last(history, "rewards/chosen"),
            "rewards_rejected": _last(history, "rewards/rejected"),
            "rewards_margins": _last(history, "rewards/margins"),
            "rewards_accuracies": _last(history, "rewards/accuracies"),
            "eval_loss": float(evaluation["eval_loss"]),
            "eval_rewards_accuracies": float(evaluation["eval_rewards/accuracies"]),
            "eval_rewards_margins": float(evaluation["eval_rewards/margins"]),
            "train_runtime_s": runtime,
            "train_steps": float(trainer.state.global_step),
            "pairs_per_s": counts["pairs"] / runtime,
            "tokens_per_s": counts["tokens"] / runtime,
            "pad_fraction": 1.0 - counts["tokens"] / max(counts["padded_tokens"], 1),
            "peak_memory_mb": peak_mb,
        }
        bad_metrics = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad_metrics:
            raise StageError(
                f"metric {bad_metrics[0]} is not finite ({metrics[bad_metrics[0]]}); nothing was published"
            )

        # Every process has finished training, evaluating and checkpointing; rank 0 alone publishes.
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return metrics
        with atomic_dir(adapter_dir) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            # Name the base by the path the pipeline loads it from, not by wherever this run found it.
            config_path = tmp / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = BASE_DIR.as_posix()
            # peft keeps target_modules as a set and writes it in hash-seed order, which differs between
            # processes: sorted, a re-run with identical weights gives an identical adapter folder, so DVC
            # does not re-run merge and evaluate for nothing.
            if isinstance(adapter_config.get("target_modules"), list):  # a regex string stays as it is
                adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            config_path.write_text(
                json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            readme = tmp / "README.md"
            if readme.exists():
                readme.unlink()  # peft's generated model card has no content of ours and embeds versions
            write_json(tmp / TRAIN_SUMMARY, train_summary(params, metrics))
        write_json(metrics_path, metrics)
        atomic_write_bytes(history_path, history_csv(history_rows(history)).encode("utf-8"))

        # Prefixed: the MLflow callback already logged transformers' own `train_loss` (a mean over the run).
        tracking.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=trainer.state.global_step)
        tracking.log_outputs({"adapter": adapter_dir})
        tracking.log_artifact(history_path)
        shutil.rmtree(run_dir, ignore_errors=True)
        return metrics


def main() -> None:
    from stages import config

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = config.load()
    if params.train.num_processes > 1 and not is_distributed_worker(os.environ):
        sys.exit(launch(params))
    if params.train.num_processes == 1:
        pin_single_device(params.train.device)  # one GPU, no DataParallel, on a multi-GPU host
    run(params)


if __name__ == "__main__":
    from stages.common import run_main

    run_main(main)
