"""GPU check: the 7B recipe's settings on a Mistral-7B-shaped model, stage by stage, with figures.

    python -m bench.gpu_check [--dry-run] [--steps 10] [--rows 1200] [--out metrics/gpu_check.json]
    make gpu-check            (make gpu-check DRY_RUN=1 on a machine without CUDA)

recipes/neuralhermes-2.5.yaml's params (QLoRA NF4 4-bit, bf16, LoRA r16 on all linear projections, beta 0.1,
batch 4 x 4, gradient checkpointing, paged AdamW 32-bit, limits 1,024 / 1,536) on a model of Mistral-7B's
shape with random weights and OpenHermes-2.5's real tokenizer (tools.hub_layout), over orca-length rows
(bench.synthetic), through the pipeline's own functions: tokenize -> pairs -> reference (a few hundred pairs)
-> train (`--steps`, at least 10) -> merge (fp16, fidelity check) -> a short evaluation (lm-eval's
dpo_heldout_pref on 32 held-out documents, one sampled answer). No DVC, no MLflow: this measures the GPU work.
Then train.distributed fsdp (FSDP2 + QLoRA) at world size 1 for 2 steps, launched as the train stage launches
it (bench.fsdp_check): the adapter it gathers and saves must hold every LoRA weight, finite.

Prints and writes: seconds per step (median after the first), tokens/s, an MFU estimate (the FLOPs the
training steps did, counted as in bench.flops, over the GPU's dense bf16 peak), peak GPU memory per stage,
and the projected time of the recipe's 200 steps. --dry-run runs the same path on the CPU with a tiny model,
fp32 and two steps (the CPU test of this script; its figures mean nothing for a GPU).

On a bare GPU machine (torch, transformers, peft, accelerate, pyarrow only), `make gpu-bundle` first puts
trl, bitsandbytes (its CUDA 13 library only) and lm-eval (without its task folders) into .gpu-bundle/, which
`make gpu-check` puts on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_pipeline import layout
from dpo_pipeline.data import tables as tables_lib
from dpo_pipeline.evaluate import harness
from dpo_pipeline.evaluate import samples as samples_lib
from dpo_pipeline.models import loading
from dpo_pipeline.models import merge as merge_lib
from dpo_pipeline.train import dpo, trl_glue
from dpo_pipeline.train import pairs as pairs_lib
from dpo_pipeline.train import reference as reference_lib

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "neuralhermes-2.5.yaml"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# Dense bf16 tensor-core peak (FLOP/s) by device name, for the MFU estimate.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def _replace(params, **sections):
    changes = {
        name: dataclasses.replace(getattr(params, name), **values) for name, values in sections.items()
    }
    return dataclasses.replace(params, **changes)


def training_datasets(work: Path, tables: dict[str, Any]) -> dict[str, Any]:
    """{split: datasets.Dataset}: the pairs stage's selection from work/tokenized in its order, with the reference
    log-probs `tables` attached, as the train stage reads them."""
    wanted = pairs_lib.training_ids(work / "pairs")
    datasets = {}
    for split in ("train", "test"):
        table = pairs_lib.rows_in_order(
            tables_lib.read_tokenized(work / "tokenized", split), wanted[split], split
        )
        table = reference_lib.attach_reference(table, tables[split], split)
        datasets[split] = pairs_lib.to_dataset(table, layout.REF_COLUMNS)
    return datasets


def recipe_params(dry_run: bool, steps: int):
    from dpo_pipeline import config

    params = config.load(RECIPE)
    params = _replace(params, train={"max_steps": steps, "warmup_steps": 1, "eval_pairs": 64})
    if dry_run:
        params = _replace(
            params,
            train={
                "device": "cpu",
                "precision": "fp32",
                "bnb_4bit_compute_dtype": "float32",
                "optim": "adamw_torch",
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "eval_pairs": 8,
            },
            merge={"device": "cpu", "dtype": "float32"},
            eval={"device": "cpu", "dtype": "float32", "batch_size": 4},
        )
    return params


class Memory:
    """Peak memory of each stage: torch.cuda's peak allocation on CUDA, the process's RSS high-water mark on
    the CPU (VmHWM cannot be reset, so on the CPU the figure is the peak so far)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peaks: dict[str, float] = {}

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def stop(self, stage: str) -> None:
        if self.cuda:
            import torch

            self.peaks[stage] = torch.cuda.max_memory_allocated() / 2**30
        else:
            from dpo_pipeline.models.loading import rss_peak_mb

            self.peaks[stage] = rss_peak_mb() / 1024


def run(dry_run: bool, steps: int, rows: int, work: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import torch
    from transformers import MistralForCausalLM, TrainerCallback

    from bench.flops import model_counts, tokenized_recipe_rows
    from dpo_pipeline.config import EvalTask
    from dpo_pipeline.models.loading import load_model, load_tokenizer, resolve_device, torch_dtype
    from tools.hub_layout import MISTRAL_7B_SHAPE, model_config, write_tokenizer

    params = recipe_params(dry_run, steps)
    cuda = resolve_device(params.train.device) == "cuda"
    if not dry_run and not cuda:
        raise SystemExit("error: no CUDA device: run `make gpu-check DRY_RUN=1` for the CPU dry run")
    shape = TINY if dry_run else MISTRAL_7B_SHAPE
    memory = Memory(cuda)
    seconds: dict[str, float] = {}
    figures: dict[str, Any] = {"dry_run": dry_run, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}

    # base: random weights of the shape, the real tokenizer, saved as the base stage publishes a hub snapshot.
    clock = time.perf_counter()
    base_dir = write_tokenizer(work / "base")
    with torch.device("cuda" if cuda else "cpu"):
        model = MistralForCausalLM(model_config(**shape)).to(torch.bfloat16)
    model.save_pretrained(base_dir, safe_serialization=True, max_shard_size="5GB")
    del model
    gc.collect()
    seconds["base_write"] = time.perf_counter() - clock

    # tokenize (with prepare's formatting) on orca-length rows, at the recipe's limits.
    clock = time.perf_counter()
    tokenized, prepared = tokenized_recipe_rows(params, rows, work)
    for name in ("tokenized", "prepared"):
        (work / name).mkdir(exist_ok=True)
    for split, table in tokenized.items():
        pq.write_table(table, work / "tokenized" / f"{split}.parquet")
    seconds["tokenize"] = time.perf_counter() - clock
    # The held-out task and the merge's fidelity prompts read the prepared strings.
    prepared_test = prepared["test"]
    pq.write_table(prepared_test, work / "prepared" / "test.parquet")

    selected, order, pair_counts = pairs_lib.build(params, work / "tokenized")
    pairs_lib.write(work / "pairs", selected, order)
    figures["pairs"] = pair_counts

    memory.start()
    clock = time.perf_counter()
    tables = reference_lib.compute(params, base_dir, work / "tokenized", work / "pairs")
    seconds["reference"] = time.perf_counter() - clock
    memory.stop("reference")
    (work / "reference").mkdir()
    for split, table in tables.items():
        pq.write_table(table, work / "reference" / f"{split}.parquet")
    figures["reference_pairs"] = sum(t.num_rows for t in tables.values())
    gc.collect()

    # train: the train stage's trainer on the pairs stage's order with the cached reference.
    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    memory.start()
    clock = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    datasets = training_datasets(work, tables)
    timer = StepTimes()
    trainer = trl_glue.trainer_class(params.train.share_prompt)(
        model=loading.load_policy(base_dir, params.train),
        args=dpo.dpo_config(params, work / "checkpoints"),
        train_dataset=datasets["train"],
        eval_dataset=datasets["test"],
        processing_class=tokenizer,
        peft_config=loading.lora_config(params.train.lora),
        callbacks=[timer],
    )
    seconds["train_load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trainer.train()
    seconds["train"] = time.perf_counter() - clock
    evaluation = trainer.evaluate()
    memory.stop("train")
    trainer.model.save_pretrained(work / "adapter", safe_serialization=True)
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    counts = trainer.pipeline_counts
    figures["eval_loss"] = float(evaluation["eval_loss"])
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # merge: unquantized base in merge.dtype straight onto the device, fold the adapter, save, check fidelity.
    from peft import PeftModel

    memory.start()
    clock = time.perf_counter()
    dtype = torch_dtype(params.merge.dtype)
    device = resolve_device(params.merge.device)
    texts = merge_lib.fidelity_texts(prepared_test, 4)
    encoded = [
        tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(device) for t in texts
    ]
    peft_model = PeftModel.from_pretrained(
        load_model(base_dir, dtype=dtype, device_map={"": device}), str(work / "adapter")
    ).eval()
    adapter_logps = [merge_lib.token_logprobs(peft_model, ids) for ids in encoded]
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(work / "merged", safe_serialization=True)
    tokenizer.save_pretrained(work / "merged")
    del merged, peft_model
    gc.collect()
    reloaded = load_model(work / "merged", dtype=dtype, device_map={"": device}).eval()
    fidelity = merge_lib.fidelity_stats(
        adapter_logps, [merge_lib.token_logprobs(reloaded, ids) for ids in encoded]
    )
    del reloaded
    gc.collect()
    seconds["merge"] = time.perf_counter() - clock
    memory.stop("merge")
    figures["merge_fidelity_max_abs"] = fidelity["max_abs"]

    # evaluate: one load, a short lm-eval run and one sampled answer.
    memory.start()
    clock = time.perf_counter()
    short = _replace(
        params,
        eval={
            "tasks": [EvalTask(name="dpo_heldout_pref", num_fewshot=0)],
            "limit": 32,
            "max_new_tokens": 32,
            "sample_prompts": params.eval.sample_prompts[:1],
        },
    )
    loaded = harness.load_eval_model(work / "merged", short.eval)
    results = harness.run_lm_eval(work / "merged", short, REPO / "tasks", work / "prepared", loaded)
    samples = samples_lib.generate_samples(work / "merged", short, loaded)
    seconds["evaluate"] = time.perf_counter() - clock
    memory.stop("evaluate")
    figures["heldout_acc_norm"] = harness.flat_scores(results, ["dpo_heldout_pref"])[
        "dpo_heldout_pref/acc_norm"
    ]
    figures["sample_answer_chars"] = len(samples[0]["answer"])

    # Figures.
    later = step_s[1:] or step_s
    median_step = statistics.median(later)
    layers = shape["num_hidden_layers"]
    matmul_params = model_counts(shape)["matmul_params"]
    # What one step computed, as bench.flops counts it: 3 forwards' worth per position run through the model,
    # padding included (frozen 4-bit base with gradient checkpointing), attention's quadratic part left out here
    # (a few percent at these lengths).
    padded = counts["positions"]
    train_flops = 3 * 2 * matmul_params * padded
    peak = next((v for k, v in PEAK_BF16.items() if k in figures["device"]), None)
    figures.update(
        {
            "steps": len(step_s),
            "first_step_s": step_s[0] if step_s else None,
            "median_step_s": median_step,
            "tokens_per_s": counts["tokens"] / seconds["train"],
            "padded_tokens_per_s": padded / seconds["train"],
            "pairs_trained": counts["pairs"],
            "train_tflops_per_s": train_flops / seconds["train"] / 1e12,
            "mfu": (train_flops / seconds["train"] / peak) if (peak and cuda) else None,
            "peak_memory_gib": memory.peaks,
            "seconds": seconds,
            "projected_200_steps_min": (step_s[0] + median_step * (200 - 1)) / 60 if step_s else None,
            "layers": layers,
        }
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same path on the CPU, tiny model, 2 steps"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default 10; 2 with --dry-run)"
    )
    parser.add_argument("--rows", type=int, default=None, help="raw rows (default 1,200; 200 with --dry-run)")
    parser.add_argument("--out", type=Path, default=REPO / "metrics" / "gpu_check.json")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.dry_run else 10)
    rows = args.rows or (200 if args.dry_run else 1200)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        started = time.perf_counter()
        figures = run(args.dry_run, steps, rows, Path(tmp))
        figures["total_s"] = time.perf_counter() - started
        # train.distributed fsdp at world size 1, through the stage's own launch command (GPUs only).
        from bench import fsdp_check

        clock = time.perf_counter()
        figures["fsdp_world_size_1"] = fsdp_check.run(Path(tmp), args.dry_run)
        figures["fsdp_s"] = time.perf_counter() - clock
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    print(f"gpu-check: wrote {args.out}")
    fsdp = figures["fsdp_world_size_1"]
    if isinstance(fsdp, dict) and not fsdp.get("ok"):
        print("error: gpu-check: the FSDP world-size-1 run failed (fsdp_world_size_1 above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
