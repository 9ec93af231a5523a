"""Every override of trl/transformers internals the training and reference stages use, and their tripwires.

Checked against the releases in TESTED (trl 1.16, transformers 5.17-5.24, peft 0.21); train and reference log
the versions in use at start-up and warn in one line outside them (log_versions):
- trainer_class: DPOTrainer with the tokenize stage's ids and the cached reference columns taken as they are
  (_prepare_dataset, _precompute_ref_logps: trl 1.16 has no public switch to skip either), the length column
  kept (_set_signature_columns_if_needed), a resume that keeps the adapter's dtype (_load_from_checkpoint), the
  NaN guard and throughput counters (training_step), and with share_prompt one row per pair for the policy and
  reference forwards (_compute_loss, compute_ref_log_probs). Every name in OVERRIDES must exist on the installed
  DPOTrainer (refused by name when the class is built) and be called by it: tests/stage/test_trl_overrides.py
  counts the calls in real reference and train runs, resume included, and that prompt sharing engaged;
- checkpointing_kwargs: the TrainingArguments name of activation checkpointing (renamed in 5.24);
- mlflow_callback: transformers' MLflowCallback made unable to fail training.
The loss types, label-smoothing rules, optimizers and schedulers params may name are plain data in config.py
(loading params imports no ML library); tests/unit/test_trl_glue.py checks them against the installed trl and
transformers, and every overridden method's arguments against trl's.
"""

from __future__ import annotations

import logging

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import IDS_COLUMNS, LENGTH_COLUMN, REF_COLUMNS

logger = logging.getLogger(__name__)

# The releases every override below was checked against, as [lowest, first untested) version prefixes.
# Outside them train and reference warn once at start-up (version_line): an override may no longer apply.
# tests/unit/test_trl_glue.py checks the installed versions against these, so a lock bump must update them.
TESTED = {"trl": ("1.16", "1.17"), "transformers": ("5.17", "5.25"), "peft": ("0.21", "0.22")}
# The DPOTrainer methods PipelineDPOTrainer overrides: each must exist on the installed trl (checked when the
# class is built) and be called by it (tests/stage/test_trl_overrides.py counts the calls in a real run).
OVERRIDES = (
    "_compute_loss",
    "compute_ref_log_probs",
    "_prepare_dataset",
    "_precompute_ref_logps",
    "_set_signature_columns_if_needed",
    "_load_from_checkpoint",
    "training_step",
)


def untested_versions(installed: dict[str, str]) -> list[str]:
    """The `name version` of each installed package outside its TESTED range."""
    from packaging.version import Version

    out = []
    for name, (low, high) in TESTED.items():
        version = Version(installed[name])
        if not Version(low) <= Version(version.base_version) < Version(high):
            out.append(f"{name} {installed[name]}")
    return out


def log_versions() -> None:
    """One line at the train and reference stages' start: the versions in use, a warning outside TESTED."""
    from importlib import metadata

    installed = {name: metadata.version(name) for name in TESTED}
    tested = ", ".join(f"{n} {lo}.x-<{hi}" for n, (lo, hi) in TESTED.items())
    here = ", ".join(f"{n} {v}" for n, v in installed.items())
    outside = untested_versions(installed)
    if outside:
        logger.warning(
            "%s untested: the overrides in dpo_pipeline/train/trl_glue.py were checked against %s; the run goes "
            "on, but an override may no longer apply (pip install -c constraints.txt -e . restores the lock)",
            ", ".join(outside),
            tested,
        )
    else:
        logger.info("%s (tested: %s)", here, tested)


def log_sharing(trainer, what: str) -> dict[str, int]:
    """One line: how many of `what`'s log-prob calls ran one row per pair (train.share_prompt); the counts."""
    shared = trainer.share_outcomes.get("shared", 0)
    fallback = trainer.share_outcomes.get("fallback", 0)
    if trainer.share_prompt:
        logger.info(
            "train.share_prompt: %d of %d %s model calls ran one row per pair%s",
            shared,
            shared + fallback,
            what,
            f" (the rest as trl's two rows: {trainer.share_outcomes['reason']})" if fallback else "",
        )
    return {"share_prompt_calls_shared": shared, "share_prompt_calls_fallback": fallback}


def checkpointing_kwargs(enabled: bool) -> dict[str, bool]:
    """The TrainingArguments keyword for activation (gradient) checkpointing: transformers 5.24 renamed
    `gradient_checkpointing` to `activation_checkpointing` (the old name is a deprecated alias that mirrors the
    new one, with a FutureWarning); older 5.x releases (the GPU image's 5.17) know only the old name."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing": enabled
    }


def new_counts() -> dict[str, int]:
    """The trainer's throughput counters: pairs and tokens (non-pad tokens of the prompt+answer sequences, the
    same count whatever the layout), and the positions the model computed (all, and those holding a token)."""
    return {"pairs": 0, "tokens": 0, "positions": 0, "real_positions": 0}


def count_batch(counts: dict[str, int], inputs, computed: dict[str, int] | None = None) -> None:
    """Add one trl two-row micro-batch (rows: chosen..., rejected...) to `counts`: its pairs and tokens, and
    the positions the model computed for it, `computed` as SharedPromptModel recorded them for one row per
    pair, else trl's two rows as they are."""
    mask = inputs["attention_mask"]
    counts["pairs"] += mask.shape[0] // 2
    counts["tokens"] += int(mask.sum())
    computed = computed or {"positions": mask.numel(), "real_positions": int(mask.sum())}
    counts["positions"] += computed["positions"]
    counts["real_positions"] += computed["real_positions"]


def _attention_implementation(trainer) -> str | None:
    return getattr(trainer.accelerator.unwrap_model(trainer.model).config, "_attn_implementation", None)


def _forward(trainer, model):
    """`model` as trl's loss and reference code call it: with share_prompt, one row per pair."""
    if not trainer.share_prompt:
        return model
    import torch

    from dpo_pipeline.train.shared_prompt import SharedPromptModel

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    weight = unwrapped.get_input_embeddings().weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    config = unwrapped.config
    # Mistral sets sliding_window (4,096); Qwen2/3 carry one that only counts with use_sliding_window.
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return SharedPromptModel(
        model,
        _attention_implementation(trainer),
        dtype,
        trainer._forward_positions,
        window,
        trainer.share_outcomes,
    )


def trainer_class(share_prompt: bool):
    """DPOTrainer plus: cached reference columns, length-grouped batching, the NaN guard, throughput counters,
    and with `share_prompt` one row per pair (dpo_pipeline.train.shared_prompt) for the policy and reference forwards."""
    import trl
    from trl import DPOTrainer

    gone = [name for name in OVERRIDES if not callable(getattr(DPOTrainer, name, None))]
    if gone:
        raise StageError(
            f"trl {trl.__version__} has no DPOTrainer.{', DPOTrainer.'.join(gone)}: the pipeline's overrides "
            f"(dpo_pipeline/train/trl_glue.py) were written for trl {TESTED['trl'][0]}; install the locked "
            "versions (pip install -c constraints.txt -e .)"
        )

    class PipelineDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            # Set before trl's __init__, which computes the reference log-probs (precompute_ref) through _forward.
            self.share_prompt = share_prompt
            self.share_outcomes: dict = {}  # SharedPromptModel's count of shared and fallen-back calls
            self.pipeline_counts = new_counts()
            self._forward_positions: dict[str, int] = {}
            super().__init__(*args, **kwargs)
            if share_prompt:
                from dpo_pipeline.train.shared_prompt import check_attention

                check_attention(_attention_implementation(self))

        def _compute_loss(self, model, inputs, return_outputs):
            return super()._compute_loss(_forward(self, model), inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            out = super().compute_ref_log_probs(_forward(self, model), inputs)
            progress = getattr(self, "_reference_progress", None)
            if progress is not None:  # the reference stage's pass (trl's own loop): rows seen so far
                progress.add(len(out[0]))
            return out

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
            from dpo_pipeline.runner import RowProgress

            self._reference_progress = RowProgress(f"reference: {name} pairs", len(dataset))
            if self.accelerator.num_processes > 1 and not dataset.cache_files:
                # trl's rank 0 writes the gathered log-probs beside the dataset's cache files and every rank
                # reads them back; an in-memory dataset's cache folder is a temp folder per process. Give it
                # one on disk in the output folder, which the processes share (reference.compute).
                from datasets import load_from_disk

                folder = f"{self.args.output_dir}/precompute-{name}"
                with self.accelerator.main_process_first():
                    if self.accelerator.is_main_process:
                        dataset.save_to_disk(folder)
                    dataset = load_from_disk(folder)
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self._reference_progress = None

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            # Keep the length column through remove_unused_columns: the length-grouped sampler reads it.
            if LENGTH_COLUMN not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, LENGTH_COLUMN]

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            keep_adapter_dtype(self, super()._load_from_checkpoint, resume_from_checkpoint, model)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self._forward_positions.clear()
            fallbacks = self.share_outcomes.get("fallback", 0)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.share_outcomes.get("fallback", 0) > fallbacks and not fallbacks:
                logger.warning(
                    "train.share_prompt: a micro-batch ran as trl's two rows (%s); counted, the rest go on",
                    self.share_outcomes.get("reason", ""),
                )
            count_batch(self.pipeline_counts, inputs, self._forward_positions)
            require_finite_loss(loss, self.state.global_step + 1)
            return loss

    return PipelineDPOTrainer


def keep_adapter_dtype(trainer, load, resume_from_checkpoint, model) -> None:
    """Resume through `load` (the Trainer's _load_from_checkpoint) keeping each trainable weight's dtype: peft's
    load_adapter upcasts the adapter to fp32 (autocast_adapter_dtype), while trl trains the adapter of a 4-bit
    model in bf16: without this a resumed run would continue in another dtype and end with a different adapter
    than an uninterrupted one. (Runs before the optimizer is built.)"""
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    load(resume_from_checkpoint, model)
    for name, param in trainer.model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def require_finite_loss(loss, step: int) -> None:
    """The NaN guard, on every micro-batch, before the optimizer can apply a NaN update; the Trainer's own
    logging would only average NaNs away (logging_nan_inf_filter)."""
    import torch

    if not torch.isfinite(loss).all():
        raise StageError(
            f"training loss is {loss.detach().float().cpu().item()} at step {step}: "
            "training diverged, nothing was published (lower train.learning_rate, check the data)"
        )


def count_rows(counts: dict[str, int], inputs) -> None:
    """Add one micro-batch of CPOTrainer/ORPOTrainer (chosen_* and rejected_* tensors, run as one concatenated
    batch padded to the longer side) or KTOTrainer (completion rows, plus the KL rows it also runs) to `counts`.
    For KTO `pairs` counts completions (half a pair each)."""
    if "chosen_attention_mask" in inputs:
        chosen, rejected = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]
        real = int(chosen.sum()) + int(rejected.sum())
        counts["pairs"] += chosen.shape[0]
        counts["tokens"] += real
        counts["positions"] += 2 * chosen.shape[0] * max(chosen.shape[1], rejected.shape[1])
        counts["real_positions"] += real
        return
    masks = [inputs["attention_mask"]] + (
        [inputs["KL_attention_mask"]] if "KL_attention_mask" in inputs else []
    )
    counts["pairs"] += inputs["attention_mask"].shape[0]
    counts["tokens"] += int(inputs["attention_mask"].sum())
    counts["positions"] += sum(m.numel() for m in masks)
    counts["real_positions"] += sum(int(m.sum()) for m in masks)


def method_trainer_class(method: str):
    """trl's trainer for a method other than dpo (config.METHODS), plus the NaN guard, throughput counters and
    a resume that keeps the adapter's dtype."""
    if method in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOTrainer as base
    elif method == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    elif method == "kto":
        from trl import KTOTrainer as base
    else:
        raise ValueError(f"no trainer for method {method!r}")

    class PipelineTrainer(base):
        def __init__(self, *args, **kwargs):
            self.pipeline_counts = new_counts()
            super().__init__(*args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            keep_adapter_dtype(self, super()._load_from_checkpoint, resume_from_checkpoint, model)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            count_rows(self.pipeline_counts, inputs)
            require_finite_loss(loss, self.state.global_step + 1)
            return loss

    PipelineTrainer.__name__ = PipelineTrainer.__qualname__ = f"Pipeline{base.__name__}"
    return PipelineTrainer


def mlflow_callback():
    """transformers' MLflowCallback, made unable to fail training: it logs into the stage's active run
    and, after a tracking error, stops logging instead of raising out of the training loop."""
    from transformers.integrations import MLflowCallback

    from dpo_pipeline import tracking

    class SafeMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            tracking._guarded(super().setup, args, state, model)
            self._initialized = True

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not tracking._state["broken"]:
                tracking._guarded(super().on_log, args, state, control, logs=logs, model=model, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            tracking._guarded(super().on_train_end, args, state, control, **kwargs)

        def on_save(self, args, state, control, **kwargs):
            tracking._guarded(super().on_save, args, state, control, **kwargs)

    return SafeMLflowCallback()
