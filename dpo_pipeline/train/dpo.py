"""DPO training pieces: trl's DPOConfig from params, checkpoints, history, the train summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import lineage
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import (
    sha256_bytes,
)
from dpo_pipeline.models.loading import damaged_file, precision_kwargs
from dpo_pipeline.train.trl_glue import checkpointing_kwargs

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

logger = logging.getLogger(__name__)


# The params the train stage declares in dvc.yaml (logged, and part of the checkpoint key and summary).
SECTIONS = ["seed", "data.max_length", "train"]
HISTORY_COLUMNS = (
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "learning_rate",
)
# metrics/eval_history.csv: the held-out pairs' figures at each train.eval_steps evaluation (trl's eval_ names).
EVAL_HISTORY_COLUMNS = (
    "step",
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/margins",
    "eval_rewards/accuracies",
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
    "eval_log_odds_chosen",
    "train_steps",
    *RUN_DEPENDENT_KEYS,
)
# Logged by some methods only: KTO has no reward accuracy (its rows are unpaired), only ORPO logs the log-odds
# of the chosen answer. metrics/train.json leaves out what the run's trainer did not log.
OPTIONAL_METRIC_KEYS = (
    "rewards_accuracies",
    "eval_rewards_accuracies",
    "eval_rewards_margins",
    "eval_log_odds_chosen",
)


# The metrics that are the same on every identical run: what train_summary.json carries.
SUMMARY_METRIC_KEYS = tuple(key for key in METRIC_KEYS if key not in RUN_DEPENDENT_KEYS)


COLLAPSE_LOSS = 0.01  # loss below this with reward accuracy pinned at 1.0 ...


COLLAPSE_EARLY_FRACTION = 0.1  # ... within this share of max_steps: the preference was learnt too easily


def common_kwargs(p: Params, out_dir: str | Path) -> dict[str, Any]:
    """The TrainingArguments every method's trl config takes from params (`out_dir` receives the checkpoints)."""
    t = p.train
    return dict(
        output_dir=str(out_dir),
        beta=t.beta,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        **checkpointing_kwargs(t.gradient_checkpointing),
        optim=t.optim,
        **precision_kwargs(t),
        seed=p.seed,
        data_seed=p.seed,
        max_length=p.data.max_length,
        # The pairs stage decided the order (seeded epochs, length-grouped when train.group_by_length) and the
        # training dataset is already in it: the trainer reads it front to back.
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=t.save_steps,
        # Only the last checkpoint is needed to resume; older ones are rotated away as new ones land.
        save_total_limit=2,  # the last two: a damaged newest one is set aside, training resumes from the other
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        # Show NaN/inf in the logs as they are; the NaN guard stops training anyway.
        logging_nan_inf_filter=False,
        # Held-out metrics every train.eval_steps (the eval pairs' reference log-probs are cached): the held-out
        # curve of metrics/eval_history.csv. The final evaluation runs after training either way.
        # (eval_steps at or past max_steps: the final evaluation is the only one, as with 0.)
        eval_strategy="steps" if 0 < t.eval_steps < t.max_steps else "no",
        eval_steps=t.eval_steps if 0 < t.eval_steps < t.max_steps else None,
        # trl's default (True) would also switch off the LoRA dropout, leaving `train.lora.dropout` inert.
        # The builtin Mistral config has no other dropout (attention_dropout 0.0).
        disable_dropout=False,
        # The MLflow callback is added explicitly (trl_glue.mlflow_callback) so it logs into the stage's run
        # and a tracking failure cannot stop training.
        report_to="none",
        run_name="train",
        dataloader_num_workers=0,
        # Only used with several processes (DDP): every LoRA weight takes part in every step, so DDP need not
        # search the graph for unused ones each step (the Trainer's default for a PEFT model would).
        ddp_find_unused_parameters=False,
        # Several nodes with node-local checkpoint folders: each node's first process writes a full copy, so
        # every node can resume (transformers: never with one folder that all nodes share).
        save_on_each_node=not one_checkpoint_copy(p),
    )


def one_checkpoint_copy(p: Params) -> bool:
    """Whether one process (global rank 0) writes the checkpoints: one node, or launch.checkpoint_storage
    shared (a folder every node sees)."""
    return p.train.num_nodes == 1 or p.launch.checkpoint_storage == "shared"


def require_same_run(accelerator: Any, key: str, resume: Path | None) -> None:
    """Every process of a multi-process or multi-node run trains the same run: the same params and input hashes
    (`key`, checkpoint_key) and the same resume point. A node with other params (a `-S` edit node 0 had and it
    lacked) or other inputs, or one that found another checkpoint, would silently train something else and
    still sum its gradients into the adapter: all stop instead, naming the ranks that differ."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    mine = (key, resume.name if resume else None)
    everyone = gather_object([mine])
    odd = [rank for rank, seen in enumerate(everyone) if seen != everyone[0]]
    if odd:
        seen = "; ".join(
            f"rank {rank}: key {k}, resume {r or 'none'}" for rank, (k, r) in enumerate(everyone)
        )
        raise StageError(
            f"train: processes {odd} disagree with rank 0 on the run (params + input hashes, resume point): "
            f"{seen}. Give every node the same params and inputs (make train-worker SET=... with node 0's -S "
            "edits; launch.checkpoint_storage shared for checkpoints every node sees)"
        )


def dpo_config(p: Params, out_dir: str | Path):
    """trl DPOConfig with every knob from params (train.method dpo); `out_dir` receives the checkpoints."""
    from trl import DPOConfig

    from dpo_pipeline.config import loss_types

    t = p.train
    return DPOConfig(
        **common_kwargs(p, out_dir),
        loss_type=loss_types(t),
        loss_weights=list(t.loss_weights) or None,
        label_smoothing=t.label_smoothing,
        ld_alpha=t.ld_alpha,
        use_weighting=t.use_weighting,
        f_divergence_type=t.f_divergence_type,
        f_alpha_divergence_coef=t.f_alpha_divergence_coef,
        discopop_tau=t.discopop_tau,
        precompute_ref_log_probs=t.precompute_ref,
    )


def checkpoint_key(params: Params, input_hashes: dict[str, str]) -> str:
    """Fingerprint of everything a checkpoint depends on: the declared params and the input hashes.

    A resume only ever picks up a checkpoint written with the same key, i.e. a compatible run.
    """

    payload = {"params": lineage.params_for(params, SECTIONS), "inputs": dict(sorted(input_hashes.items()))}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())[:16]


def checkpoint_problem(path: Path) -> str | None:
    """What keeps the Trainer from resuming from checkpoint folder `path` (None: every file loads): its
    trainer_state.json (written last: missing when the save was killed), and each JSON, safetensors and torch
    file read whole, as a resume reads them (loading.damaged_file)."""
    found = damaged_file(path, required=("trainer_state.json",), whole=True)
    return f"{found[0].name}: {found[1]}" if found else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` folder every file of which loads. A damaged one is set aside (renamed
    `checkpoint-N.damaged`, one warning naming it and the file) and the one before it is tried: a damaged
    checkpoint never wedges training (dpo_config keeps two), and with none left training starts from zero."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    for path in run_dir.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    for _step, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        logger.warning(
            "train: checkpoint %s cannot be resumed from (%s): set aside as %s; trying the one before it",
            path,
            problem,
            aside.name,
        )
    return None


def history_rows(
    log_history: list[dict[str, Any]], columns: tuple[str, ...] = HISTORY_COLUMNS
) -> list[dict[str, Any]]:
    """One row per training logging step (eval and summary entries skipped), HISTORY_COLUMNS only; with
    EVAL_HISTORY_COLUMNS, one row per periodic held-out evaluation instead."""
    key = "eval_loss" if columns == EVAL_HISTORY_COLUMNS else "loss"
    rows: dict[Any, dict[str, Any]] = {}
    for entry in log_history:
        if key not in entry or "step" not in entry:
            continue
        # One row per step: the final evaluation after training lands on the last step, where the periodic one
        # (train.eval_steps dividing max_steps) may already be; it is the same model, the later entry is kept.
        rows[entry["step"]] = {col: entry.get(col, "") for col in columns}
    return list(rows.values())


def history_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = HISTORY_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def is_collapse(logs: dict[str, Any], step: int, max_steps: int) -> bool:
    """Loss near 0 with reward accuracy pinned at 1.0 early in training."""
    early = step <= max(1, math.ceil(COLLAPSE_EARLY_FRACTION * max_steps))
    loss, accuracy = logs.get("loss"), logs.get("rewards/accuracies")
    return early and loss is not None and accuracy is not None and loss < COLLAPSE_LOSS and accuracy >= 1.0


def train_summary(params: Params, metrics: dict[str, float]) -> dict[str, Any]:
    """models/adapter/train_summary.json: the declared params and the deterministic metrics only."""

    return {
        "params": lineage.params_for(params, SECTIONS),
        "metrics": {key: metrics[key] for key in SUMMARY_METRIC_KEYS if key in metrics},
    }


def progress_line(step: int, total: int, logs: dict[str, float], elapsed: float, done: int) -> str:
    """One training progress line: step/total, loss, the reward margin and accuracy where the method logs them,
    elapsed time and the ETA from this run's pace (steps resumed from a checkpoint are not counted)."""
    parts = [f"train: step {step}/{total}", f"loss {logs['loss']:.4f}"]
    if "rewards/margins" in logs:
        parts.append(f"margin {logs['rewards/margins']:+.3f}")
    if "rewards/accuracies" in logs:
        parts.append(f"acc {logs['rewards/accuracies']:.2f}")
    eta = elapsed / done * (total - step) if done else None
    clock = f"{elapsed:.0f}s elapsed" + (f", eta {eta:.0f}s" if eta is not None else "")
    return " ".join(parts) + f" | {clock}"


def progress_callback(max_steps: int, stream=None):
    """Training progress in place of the Trainer's raw log dicts: on a terminal a tqdm bar with a line per log
    (tqdm.write, so the bar stays at the bottom); off a terminal (`dvc repro` captures stderr) a plain line every
    train.logging_steps. Main process only."""
    import sys
    import time

    from transformers import TrainerCallback

    out = stream if stream is not None else sys.stderr
    tty = hasattr(out, "isatty") and out.isatty()

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first = time.perf_counter(), state.global_step
            self.bar = None
            if tty and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=max_steps, initial=state.global_step, desc="train", file=out)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.started
            line = progress_line(state.global_step, max_steps, logs, elapsed, state.global_step - self.first)
            if self.bar is not None:
                self.bar.write(line, file=out)
            else:
                print(line, file=out, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def final_evaluation(log_history: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    """The evaluation logged at `step` (the last one) by the periodic held-out evaluation, or None."""
    for entry in reversed(log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return entry
    return None


def quiet_trainer_output(trainer) -> None:
    """Drop the Trainer's own printers (PrinterCallback prints every log dict; ProgressCallback writes them
    under its bar): progress_callback says the same in one line."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


def collapse_callback(max_steps: int):
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
                from dpo_pipeline import tracking

                tracking.set_tags({"collapse_warning": "true", "collapse_step": state.global_step})

    return CollapseWatch()


def across_processes(
    accelerator: Any, counts: dict[str, int], peak_mb: float
) -> tuple[dict[str, int], float]:
    """Token/pair counts summed and the peak memory maxed over all processes (a collective: every rank calls)."""
    import torch

    names = sorted(counts)
    local = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    peak = accelerator.gather(torch.tensor([peak_mb], dtype=torch.float64, device=accelerator.device))
    return {n: int(v) for n, v in zip(names, total, strict=True)}, float(peak.max())


def last_logged(log_history: list[dict[str, Any]], key: str) -> float:
    for entry in reversed(log_history):
        if key in entry and "loss" in entry:
            return float(entry[key])
    return float("nan")


def final_metrics(
    history: list[dict[str, Any]],
    evaluation: dict[str, Any],
    runtime: float,
    steps: int,
    counts: dict[str, int],
    peak_mb: float,
) -> dict[str, float]:
    """metrics/train.json (see the train stage's docstring for what each figure means). A figure in
    OPTIONAL_METRIC_KEYS that the method's trainer did not log is left out."""
    logged = {
        "train_loss": last_logged(history, "loss"),
        "rewards_chosen": last_logged(history, "rewards/chosen"),
        "rewards_rejected": last_logged(history, "rewards/rejected"),
        "rewards_margins": last_logged(history, "rewards/margins"),
        "rewards_accuracies": last_logged(history, "rewards/accuracies"),
        "eval_loss": float(evaluation.get("eval_loss", "nan")),
        "eval_rewards_accuracies": float(evaluation.get("eval_rewards/accuracies", "nan")),
        "eval_rewards_margins": float(evaluation.get("eval_rewards/margins", "nan")),
        "eval_log_odds_chosen": float(evaluation.get("eval_log_odds_chosen", "nan")),
    }
    absent = {key for key in OPTIONAL_METRIC_KEYS if math.isnan(logged[key])}
    return {
        **{key: value for key, value in logged.items() if key not in absent},
        "train_runtime_s": runtime,
        "train_steps": float(steps),
        "pairs_per_s": counts["pairs"] / runtime,
        "tokens_per_s": counts["tokens"] / runtime,
        "pad_fraction": 1.0 - counts["real_positions"] / max(counts["positions"], 1),
        "peak_memory_mb": peak_mb,
    }


def adapter_state(trainer: Any) -> dict[str, Any] | None:
    """The whole model's state dict, gathered from its shards under FSDP (the accelerate config's
    FULL_STATE_DICT) or ZeRO-3 (zero3_save_16bit_model); None without sharding, where the model holds it whole.
    A collective under sharding: every process calls it."""
    accelerator = trainer.accelerator
    if not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        return None
    return accelerator.get_state_dict(trainer.model)


def save_adapter(model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, Any] | None = None) -> None:
    """The LoRA adapter and its tokenizer into `folder`, deterministically: identical weights give a
    byte-identical folder, so DVC does not re-run merge and evaluate for nothing. `state_dict`: the gathered
    weights of a sharded model (adapter_state); peft picks the adapter's out of it."""
    import json

    from dpo_pipeline.layout import BASE_DIR

    model.save_pretrained(
        folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {})
    )
    tokenizer.save_pretrained(folder)
    # Name the base by the path the pipeline loads it from, not by wherever this run found it.
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = BASE_DIR.as_posix()
    # peft keeps target_modules as a set and writes it in hash-seed order, which differs between processes.
    if isinstance(adapter_config.get("target_modules"), list):  # a regex string stays as it is
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    readme = folder / "README.md"
    if readme.exists():
        readme.unlink()  # peft's generated model card has no content of ours and embeds versions


def training_datasets(
    params: Params, tokenized_dir: Path, pairs_dir: Path, reference_dir: Path, hashes: dict[str, str]
) -> dict[str, Any]:
    """{split: datasets.Dataset} of the pairs the pairs stage selected, in its order, with the cached reference
    log-probs attached when `train.precompute_ref` (checked against the inputs they were computed from)."""
    from dpo_pipeline.data.tables import read_tokenized
    from dpo_pipeline.layout import REF_COLUMNS, SPLITS
    from dpo_pipeline.train import reference
    from dpo_pipeline.train.pairs import rows_in_order, to_dataset, training_ids

    tokenized = {split: read_tokenized(tokenized_dir, split) for split in SPLITS}
    wanted = training_ids(pairs_dir)
    datasets = {}
    for split in SPLITS:
        table = rows_in_order(tokenized[split], wanted[split], tokenized_dir / f"{split}.parquet")
        keep: tuple[str, ...] = ()
        if params.train.precompute_ref:
            expected = {
                "base_hash": hashes["base"],
                "tokenized_hash": hashes["tokenized"],
                "selected_hash": hashes["selected"],
                "params": lineage.params_for(params, reference.SECTIONS),
            }
            cached = reference.read_reference(reference_dir, split, expected)
            table = reference.attach_reference(table, cached, reference_dir / f"{split}.parquet")
            keep = REF_COLUMNS
        datasets[split] = to_dataset(table, keep)
    return datasets


def require_finite_metrics(metrics: dict[str, float]) -> None:
    """Refuse to publish a run whose final metrics hold a NaN or inf."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise StageError(f"metric {bad[0]} is not finite ({metrics[bad[0]]}); nothing was published")


def require_finite_adapter(model) -> None:
    """Refuse to publish an adapter holding a NaN or inf weight."""
    import torch

    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise StageError(f"adapter weight {bad[0]} is not finite after training; nothing was published")
