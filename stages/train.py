"""train stage: QLoRA preference tuning of the base model (train.method: dpo, simpo, cpo, orpo, kto).

Method dpo is described below; the others run trl's own trainers on the text of the same selected pairs
(data/prepared/, in the pairs stage's order) and read no cached reference: dpo_pipeline/train/methods.py.

Reads: params `seed`, `data.max_length`, `train`; models/base/ (model + ChatML tokenizer);
data/tokenized/{train,test}.parquet (the token ids of the prepared pairs, written by stages/tokenize.py and
handed to trl as they are: this stage never tokenizes); data/pairs/ (which pairs, in which order: written by
stages/pairs.py; the trainer reads the training pairs front to back in that order, the held-out subset for
eval_*); data/reference/ (cached reference log-probs of exactly those pairs, written by stages/reference.py,
used when `train.precompute_ref` is true).
Writes: models/adapter/ (PEFT adapter as adapter_model.safetensors + adapter_config.json, and the tokenizer),
metrics/train.json (flat final metrics that identical runs share), metrics/train_timing.json (timings, throughput,
peak memory: an output, not a DVC metric), metrics/train_history.csv (one row per logging step, for DVC plots),
metrics/eval_history.csv (the held-out pairs' reward accuracy and margin every train.eval_steps).

metrics/train.json: train_loss and rewards_* are the last logged training values (trl's means over the
last logging window); eval_* come from trainer.evaluate on the held-out test split after training
(eval_rewards_accuracies: share of test pairs whose chosen reward beats the rejected one); pairs_per_s and
tokens_per_s count what was trained on (tokens: non-pad tokens of both prompt+answer sequences, whatever the
layout); pad_fraction is the share of padding in the positions the model computed (with `train.share_prompt`
one row per pair: prompt, chosen, a copy of the prompt's last token, rejected); peak_memory_mb is the process's peak RSS on CPU,
torch.cuda.max_memory_allocated on GPU (with several processes: counts summed, memory the largest process's).
Scratch: .scratch/checkpoints/train/<fingerprint>/ holds checkpoints every `train.save_steps`; a later run
with the same params and inputs resumes from the last complete one, and a finished run deletes them.

The frozen base is loaded once (4-bit NF4 through bitsandbytes when `train.load_in_4bit`), LoRA is added by
trl's DPOTrainer from `peft_config`, and the reference model is that same base with the adapter disabled.
models/adapter/train_summary.json (read by the merge stage's model card) holds the declared params and the
deterministic metrics only (losses, rewards, steps: no runtime, throughput or memory), so identical runs give
a byte-identical adapter folder.

Several processes, GPUs, FSDP or DeepSpeed: dpo_pipeline/train/launch.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import layout
from dpo_pipeline.config import METHODS
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, atomic_write_bytes, sha256_tree, template_hash, write_json
from dpo_pipeline.models import loading
from dpo_pipeline.train import dpo, methods, trl_glue
from dpo_pipeline.train.launch import (
    die_with_parent,
    is_distributed_worker,
    join_restarted_group,
    launch,
    needs_launcher,
    world_size,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

SECTIONS = dpo.SECTIONS  # the params this stage reads (dvc.yaml declares the same)
logger = logging.getLogger("stages.train")  # the same name when run as __main__


def run(
    params: Params,
    base_dir: str | Path = layout.BASE_DIR,
    tokenized_dir: str | Path = layout.TOKENIZED_DIR,
    reference_dir: str | Path = layout.REFERENCE_DIR,
    adapter_dir: str | Path = layout.ADAPTER_DIR,
    metrics_path: str | Path = layout.METRICS_DIR / "train.json",
    history_path: str | Path = layout.METRICS_DIR / "train_history.csv",
    checkpoint_dir: str | Path | None = None,
    extra_callbacks: Sequence[Any] = (),
    pairs_dir: str | Path = layout.PAIRS_DIR,
    prepared_dir: str | Path = layout.PREPARED_DIR,
    eval_history_path: str | Path | None = None,
    timing_path: str | Path | None = None,
) -> dict[str, float]:
    """Train the adapter; returns the metrics written to `metrics_path`.

    The MLflow run is tagged with the adapter's sha256 (tracking.ADAPTER_SHA256_TAG): merge, evaluate and report
    find it by that content hash. No run id is written to any output, so identical weights give byte-identical
    outputs and leave every later stage up to date."""
    from dpo_pipeline import lineage, tracking

    base_dir, tokenized_dir, reference_dir = Path(base_dir), Path(tokenized_dir), Path(reference_dir)
    t = params.train
    group = int(os.environ.get("WORLD_SIZE", "1"))
    if group != world_size(params):
        raise StageError(
            f"train.num_processes x train.num_nodes is {world_size(params)} but this process runs in "
            f"a group of {group}: start the stage with `python -m stages.train` (node 0) or `make "
            "train-worker` (the other nodes), which launch the processes themselves"
        )

    pairs_dir = Path(pairs_dir)
    inputs = {
        "base": base_dir,
        "tokenized": tokenized_dir,
        "selected": pairs_dir / layout.SELECTED_FILE,
        "order": pairs_dir / layout.ORDER_FILE,
        "reference": reference_dir,
    }
    if t.method != "dpo":  # the other methods' trainers read the text (dpo_pipeline/train/methods.py)
        inputs["prepared"] = Path(prepared_dir)
    with tracking.stage_run("train", params, sections=dpo.SECTIONS, inputs=inputs) as mlflow_run:
        trl_glue.log_versions()

        loading.require_safetensors(
            base_dir
        )  # a clear error before transformers would try the hub with the path
        # Before any weights load: every LoRA target a linear layer of this base (validate checked it already
        # when the base's family was known from params or the HF cache; this covers the rest).
        loading.check_target_modules(
            list(t.lora.target_modules), loading.base_module_kinds(base_dir), str(base_dir / "config.json")
        )
        tokenizer = loading.load_tokenizer(base_dir)
        tracking.set_tags(
            {"chat_template.sha256": template_hash(tokenizer.chat_template), "collapse_warning": "false"}
        )
        hashes = lineage.input_hashes(mlflow_run, inputs)

        if t.method == "dpo":
            datasets = dpo.training_datasets(params, tokenized_dir, pairs_dir, reference_dir, hashes)
            trainer_class = trl_glue.trainer_class(t.share_prompt)
        else:
            datasets = methods.text_datasets(params, Path(prepared_dir), pairs_dir, tokenizer.eos_token)
            trainer_class = trl_glue.method_trainer_class(t.method)
        logger.info("train.method %s: %s", t.method, METHODS[t.method]["trainer"])
        for line in methods.inert_options(params):
            logger.warning(line)

        run_dir = Path(checkpoint_dir or params.launch.checkpoint_dir) / dpo.checkpoint_key(params, hashes)
        resume = dpo.latest_checkpoint(run_dir)
        tracking.set_tags({"checkpoint_dir": str(run_dir), "resumed_from": str(resume) if resume else ""})
        if resume:
            print(f"train: resuming from {resume}", file=sys.stderr)

        device = loading.resolve_device(t.device)
        model = loading.load_policy(base_dir, t)
        collapse = dpo.collapse_callback(t.max_steps)
        trainer = trainer_class(
            model=model,
            args=methods.trainer_config(params, run_dir),
            train_dataset=datasets["train"],
            eval_dataset=datasets["test"],
            processing_class=tokenizer,
            peft_config=loading.lora_config(t.lora),
            callbacks=[
                trl_glue.mlflow_callback(),
                collapse,
                dpo.progress_callback(t.max_steps),
                *extra_callbacks,
            ],
        )
        dpo.quiet_trainer_output(trainer)
        accelerator = trainer.accelerator
        logger.info(
            "process %d of %d (%s, %s)",
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.distributed_type.value,
            accelerator.device,
        )
        dpo.require_same_run(accelerator, run_dir.name, resume)

        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = float(output.metrics.get("train_runtime", time.perf_counter() - started))
        dpo.require_finite_adapter(trainer.model)

        if t.method == "dpo":
            tracking.log_metrics(trl_glue.log_sharing(trainer, "training"))
        # The held-out figures after the last step: the periodic evaluation's when train.eval_steps divides
        # max_steps (the same model: evaluating again would only cost another pass over the eval pairs).
        evaluation = (
            dpo.final_evaluation(trainer.state.log_history, trainer.state.global_step) or trainer.evaluate()
        )
        history = trainer.state.log_history
        counts, peak_mb = dpo.across_processes(
            accelerator, trainer.pipeline_counts, loading.peak_memory_mb(device)
        )
        metrics = dpo.final_metrics(history, evaluation, runtime, trainer.state.global_step, counts, peak_mb)
        dpo.require_finite_metrics(metrics)

        # Every process takes part in gathering the adapter (sharded under fsdp / zero3); rank 0 alone publishes.
        adapter_state = dpo.adapter_state(trainer)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            if accelerator.is_local_main_process and not dpo.one_checkpoint_copy(params):
                shutil.rmtree(run_dir, ignore_errors=True)  # this node's own copy of the checkpoints
            return metrics
        with atomic_dir(adapter_dir) as tmp:
            dpo.save_adapter(accelerator.unwrap_model(trainer.model), tokenizer, tmp, adapter_state)
            write_json(tmp / layout.TRAIN_SUMMARY, dpo.train_summary(params, metrics))
        # The figures identical runs share are DVC metrics; timings, throughput and memory go beside them (a
        # plain output), so `dvc metrics diff` lists what changed in the model, not the clock.
        write_json(metrics_path, {k: v for k, v in metrics.items() if k not in dpo.RUN_DEPENDENT_KEYS})
        timing_path = Path(timing_path or Path(metrics_path).with_name("train_timing.json"))
        write_json(timing_path, {k: v for k, v in metrics.items() if k in dpo.RUN_DEPENDENT_KEYS})
        atomic_write_bytes(history_path, dpo.history_csv(dpo.history_rows(history)).encode("utf-8"))
        # Beside train_history.csv unless told otherwise (tests pass their own folders).
        eval_history_path = Path(eval_history_path or Path(history_path).with_name("eval_history.csv"))
        held_out = dpo.history_rows(history, dpo.EVAL_HISTORY_COLUMNS)
        atomic_write_bytes(
            eval_history_path, dpo.history_csv(held_out, dpo.EVAL_HISTORY_COLUMNS).encode("utf-8")
        )

        # Prefixed: the MLflow callback already logged transformers' own `train_loss` (a mean over the run).
        tracking.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=trainer.state.global_step)
        tracking.log_outputs({"adapter": adapter_dir})
        tracking.set_tags({tracking.ADAPTER_SHA256_TAG: sha256_tree(adapter_dir)})
        tracking.log_artifact(history_path)
        shutil.rmtree(run_dir, ignore_errors=True)
        from dpo_pipeline.runner import summary

        held_out = (
            f"held-out reward accuracy {metrics['eval_rewards_accuracies']:.3f}, margin "
            f"{metrics['eval_rewards_margins']:+.3f}"
            if "eval_rewards_accuracies" in metrics
            else f"held-out loss {metrics.get('eval_loss', float('nan')):.4f}"
        )
        summary(
            "train",
            f"{t.method}: {metrics['train_steps']:.0f} steps in {runtime:.1f} s, loss {metrics['train_loss']:.4f}; "
            f"{held_out} -> {adapter_dir}",
        )
        return metrics


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from dpo_pipeline import config

    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker",
        action="store_true",
        help="join a train.num_nodes > 1 run as a node other than node 0 (what `make train-worker` runs, after "
        "pulling train's inputs); node 0 runs `dvc repro`",
    )
    args = parser.parse_args(argv)
    params = config.load()
    if is_distributed_worker(os.environ):
        die_with_parent()  # a worker never outlives its launcher (and never publishes without it)
        join_restarted_group(params.train.num_nodes, loading.resolve_device(params.train.device))
    elif args.worker:
        if params.train.num_nodes == 1:
            raise StageError("--worker: train.num_nodes is 1; with one node `dvc repro` runs the whole stage")
        sys.exit(launch(params, worker=True))
    elif needs_launcher(params):
        sys.exit(launch(params))
    if world_size(params) == 1:
        loading.pin_single_device(params.train.device)  # one GPU, no DataParallel, on a multi-GPU host
    run(params)


def main() -> None:
    from dpo_pipeline.runner import run_main

    run_main(_main)


if __name__ == "__main__":
    main()
