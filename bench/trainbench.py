"""One measured training (or reference pass) in a fresh process, so peak memories never mix.

    python -m bench.trainbench MODE --params JSON --base DIR --prepared DIR --tokenized DIR --reference DIR
                               --out JSON

MODE
  ours       the train stage's path: the library's builders (load_policy: one 4-bit base + LoRA, the
             reference = the adapter disabled), the tokenize stage's ids from --tokenized in the pairs stage's
             order (--reference/pairs, length-grouped when train.group_by_length), cached reference log-probs
             read from --reference (attach_reference), the stage's trainer class (one row per pair with
             train.share_prompt).
  baseline   the article's way: the same 4-bit policy + LoRA, a SECOND 4-bit copy of the base passed as
             ref_model so trl computes the reference log-probs on the fly every step, random batching, the
             prepared strings from --prepared tokenized by trl (same rows, same ids); every other setting is
             the same DPOConfig (dpo_pipeline.train.dpo.dpo_config).
  reference  the pairs stage's work (pairs_lib.build: which pairs, which order, into --reference/pairs) and the
             reference stage's (dpo_pipeline.train.reference.compute) on those pairs only; writes the cached log-probs to
             --reference for `ours`.

The params file is a JSON dump of the (already overridden) params dataclasses. The process writes one JSON
object: phase times (import, data, load, init, train) in wall-clock and process CPU seconds, pairs and tokens
trained, and memory high-water marks: the whole process's peak RSS (VmHWM) and, reset just before
trainer.train(), the training phase's own peak (the resident model plus what training adds, without the
loading transients); on the GPU torch.cuda.max_memory_allocated likewise.
Nothing is tracked in MLflow and nothing in the repo is written.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from dpo_pipeline import layout  # noqa: E402
from dpo_pipeline.data import tables as tables_lib  # noqa: E402
from dpo_pipeline.data import tokens  # noqa: E402
from dpo_pipeline.models import loading  # noqa: E402
from dpo_pipeline.train import dpo, trl_glue  # noqa: E402
from dpo_pipeline.train import pairs as pairs_lib  # noqa: E402
from dpo_pipeline.train import reference as reference_lib  # noqa: E402

MODES = ("ours", "baseline", "reference")


def rss_peak_mb() -> float:
    """This process's resident-set high-water mark in MiB: dpo_pipeline.models.loading.rss_peak_mb, imported when first
    called (after the timed imports, which include the library)."""
    from dpo_pipeline.models.loading import rss_peak_mb as peak

    return peak()


def rss_now_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the training phase's alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
        return True
    except OSError:
        return False


def load_params(path: str | Path):
    from dpo_pipeline import config

    return config.parse(json.loads(Path(path).read_text(encoding="utf-8")), source=str(path))


def load_reference_model(base_dir: Path, t):
    """The article's ref_model: a second 4-bit copy of the base (frozen, no k-bit training preparation).

    Loaded by loading.load_base, i.e. with exactly load_policy's dtype/quantization/device and bitsandbytes'
    CPU bf16 repacking switched off, so both sides multiply the same way.
    """
    from dpo_pipeline.models.loading import load_base

    model = load_base(base_dir, t)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def counting_trainer_class():
    """Plain trl DPOTrainer (the article's) with the same pair/token counters as the stage's trainer."""
    from trl import DPOTrainer

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            trl_glue.count_batch(self.pipeline_counts, inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingDPOTrainer


def step_timer():
    """A TrainerCallback recording the wall-clock and process CPU time at every optimizer step's end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.tokens: list[int] = []
            self.counts: dict[str, int] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu_times.append(time.process_time())
            self.tokens.append(self.counts.get("tokens", 0))

    return StepTimer()


def _train(
    mode: str, params, base_dir: Path, prepared_dir: Path, tokenized_dir: Path, reference_dir: Path
) -> dict:
    import pyarrow.parquet as pq

    from dpo_pipeline.models.loading import load_tokenizer, resolve_device

    if mode == "baseline":
        # The article: the reference log-probs on the fly from ref_model, random batches, trl's two rows per
        # pair (plain DPOTrainer). Nothing else differs.
        params = dataclasses.replace(
            params,
            train=dataclasses.replace(
                params.train, precompute_ref=False, group_by_length=False, share_prompt=False
            ),
        )
    t = params.train
    result: dict = {}
    clock = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    if mode == "ours":
        # The pairs the pairs stage selected, in its order (made by the `reference` worker, charged to ours).

        path = tokenized_dir / "train.parquet"
        order = pairs_lib.read_order(reference_dir / "pairs")
        table = pairs_lib.rows_in_order(tables_lib.read_tokenized(tokenized_dir, "train"), order, path)
        path = reference_dir / "train.parquet"
        table = reference_lib.attach_reference(table, pq.read_table(path), path)
        dataset = pairs_lib.to_dataset(table, layout.REF_COLUMNS)
    else:
        # The article's dataset: prompt / chosen / rejected strings (the ones tokenize made ours from).
        from datasets import Dataset

        table = tokens.trl_texts(pq.read_table(prepared_dir / "train.parquet"), tokenizer.eos_token)
        dataset = Dataset(table.select(["prompt", "chosen", "rejected"]))
    result["data_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model = loading.load_policy(base_dir, t)
    ref_model = load_reference_model(base_dir, t) if mode == "baseline" else None
    result["load_s"] = time.perf_counter() - clock
    result["rss_after_load_mb"] = rss_peak_mb()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as out_dir:
        clock = time.perf_counter()
        args = dpo.dpo_config(params, out_dir)
        if mode == "ours":
            trainer = trl_glue.trainer_class(t.share_prompt)(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=loading.lora_config(t.lora),
            )
        else:
            trainer = counting_trainer_class()(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=loading.lora_config(t.lora),
            )
        if mode != "ours":
            trainer.pipeline_counts = trl_glue.new_counts()
        timer = step_timer()
        timer.counts = trainer.pipeline_counts
        trainer.add_callback(timer)
        result["init_s"] = time.perf_counter() - clock

        import gc

        gc.collect()
        result["rss_before_train_mb"] = rss_now_mb()
        result["peak_rss_before_train_mb"] = rss_peak_mb()
        phase_peak = reset_rss_peak()
        if resolve_device(t.device) == "cuda":
            import torch

            result["peak_cuda_before_train_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        clock, cpu_clock = time.perf_counter(), time.process_time()
        trainer.train()
        result["train_s"] = time.perf_counter() - clock
        # CPU seconds of all this process's threads: far less sensitive than wall time to other processes
        # competing for the cores.
        result["train_cpu_s"] = time.process_time() - cpu_clock
        if phase_peak:
            # The training phase's own peak: the resident model plus what training adds; loading transients
            # (weights read, converted and quantized) are excluded, like torch.cuda.max_memory_allocated after
            # a reset on the GPU.
            result["train_peak_rss_mb"] = rss_peak_mb()
        if resolve_device(t.device) == "cuda":
            import torch

            result["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for suffix, marks in (("", timer.times), ("_cpu", timer.cpu_times)):
        steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        result[f"step{suffix}_s"] = steps
        if steps:
            result[f"first_step{suffix}_s"] = steps[0]
            later = sorted(steps[1:])
            if later:
                # After the first step, which carries one-off warm-up work (lazy initialisation) on both sides.
                result[f"later_steps{suffix}_s"] = sum(later)
                result[f"median_later_step{suffix}_s"] = later[len(later) // 2]
                result[f"best_later_step{suffix}_s"] = later[0]
    counts = trainer.pipeline_counts
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    steps_done = trainer.state.global_step
    result.update(
        later_pairs=counts["pairs"] * (steps_done - 1) / steps_done if steps_done > 1 else 0,
        later_tokens=counts["tokens"] - timer.tokens[0] if timer.tokens else 0,
        step_tokens=[b - a for a, b in zip([0, *timer.tokens], timer.tokens, strict=False)],
        steps=steps_done,
        pairs=counts["pairs"],
        tokens=counts["tokens"],
        positions=counts["positions"],
        pad_fraction=1.0 - counts["real_positions"] / max(counts["positions"], 1),
        last_loss=float(losses[-1]) if losses else float("nan"),
    )
    return result


def _reference(params, base_dir: Path, tokenized_dir: Path, reference_dir: Path) -> dict:
    import pyarrow.parquet as pq

    clock, cpu_clock = time.perf_counter(), time.process_time()
    # The pairs stage (which pairs, which order), then the reference stage on those pairs only.
    pairs_dir = reference_dir / "pairs"
    selected, order, _ = pairs_lib.build(params, tokenized_dir)
    pairs_lib.write(pairs_dir, selected, order)
    tables = reference_lib.compute(
        params, base_dir, tokenized_dir, pairs_dir
    )  # load + forward, as the stage does
    result = {"compute_s": time.perf_counter() - clock, "compute_cpu_s": time.process_time() - cpu_clock}
    reference_dir.mkdir(parents=True, exist_ok=True)
    for split, table in tables.items():
        pq.write_table(table, reference_dir / f"{split}.parquet")
    result["rows"] = sum(table.num_rows for table in tables.values())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--params", required=True)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--prepared", required=True, type=Path)
    parser.add_argument("--tokenized", required=True, type=Path)
    parser.add_argument("--reference", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    clock = time.perf_counter()
    import bitsandbytes  # noqa: F401 - the lazily imported libraries are timed with the imports,
    import peft  # noqa: F401 - not with the first phase that happens to touch them
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    from dpo_pipeline.models import loading  # noqa: F401, F811

    result: dict = {"mode": args.mode, "import_s": time.perf_counter() - clock}
    result["rss_after_import_mb"] = rss_peak_mb()
    params = load_params(args.params)
    device = loading.resolve_device(params.train.device)
    result["device"] = device
    if args.mode == "reference":
        result.update(_reference(params, args.base, args.tokenized, args.reference))
    else:
        result.update(_train(args.mode, params, args.base, args.prepared, args.tokenized, args.reference))
    # The whole process's peaks (the training phase's peak was reset, so take the larger of both phases).
    result["peak_rss_mb"] = max(rss_peak_mb(), result.get("peak_rss_before_train_mb", 0.0))
    if device == "cuda":
        result["peak_cuda_mb"] = max(
            torch.cuda.max_memory_allocated() / 2**20, result.get("peak_cuda_before_train_mb", 0.0)
        )
    result["process_s"] = time.perf_counter() - STARTED
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(result, sort_keys=True), file=sys.stderr)


if __name__ == "__main__":
    main()
