"""Every override of trl/transformers internals, and the facts about trl the config checks rely on.

Checked against trl 1.16, transformers 5.24, peft 0.21.2:
- trainer_class: DPOTrainer with the tokenize stage's ids and the cached reference columns taken as they are,
  the length column kept, a resume that keeps the adapter's dtype, the NaN guard and throughput counters;
- DPO_LOSS_TYPES, LABEL_SMOOTHING_RULES: trl's loss types and what each needs of label_smoothing;
- OPTIMIZERS, LR_SCHEDULERS: the `optim` and `lr_scheduler_type` names training can use with these params and
  the pinned packages (transformers knows more: those need packages or scheduler arguments this pipeline lacks);
- checkpointing_kwargs: the TrainingArguments name of activation checkpointing (renamed in 5.24);
- mlflow_callback: transformers' MLflowCallback made unable to fail training.
tests/unit/test_trl_glue.py fails when an upgrade changes one of them (a loss type added or dropped, an
overridden method renamed or given other arguments).
"""

from __future__ import annotations

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import IDS_COLUMNS, LENGTH_COLUMN, REF_COLUMNS


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
        model, _attention_implementation(trainer), dtype, trainer._forward_positions, window
    )


def trainer_class(share_prompt: bool):
    """DPOTrainer plus: cached reference columns, length-grouped batching, the NaN guard, throughput counters,
    and with `share_prompt` one row per pair (dpo_pipeline.train.shared_prompt) for the policy and reference forwards."""
    import torch
    from trl import DPOTrainer

    class PipelineDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            # Set before trl's __init__, which computes the reference log-probs (precompute_ref) through _forward.
            self.share_prompt = share_prompt
            self.pipeline_counts = new_counts()
            self._forward_positions: dict[str, int] = {}
            super().__init__(*args, **kwargs)
            if share_prompt:
                from dpo_pipeline.train.shared_prompt import check_attention

                check_attention(_attention_implementation(self))

        def _compute_loss(self, model, inputs, return_outputs):
            return super()._compute_loss(_forward(self, model), inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(_forward(self, model), inputs)

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
            self._forward_positions.clear()
            loss = super().training_step(model, inputs, num_items_in_batch)
            count_batch(self.pipeline_counts, inputs, self._forward_positions)
            # Checked on every micro-batch, before the optimizer can apply a NaN update; the Trainer's own
            # logging would only average NaNs away (logging_nan_inf_filter).
            if not torch.isfinite(loss).all():
                raise StageError(
                    f"training loss is {loss.detach().float().cpu().item()} at step {self.state.global_step + 1}: "
                    "training diverged, nothing was published (lower train.learning_rate, check the data)"
                )
            return loss

    return PipelineDPOTrainer


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
