"""The benchmark suite (issue 7): our pipeline against the article's way, measured in one run on one machine.

    python -m bench.run [--quick] [--full-repro] [--only prepare,small,large,dvc] [--keep]
    make bench

Writes metrics/bench.json (flat numeric keys, for `dvc metrics show/diff` and the README) and prints a table.

Sections (every measured process is a fresh subprocess, so imports and memory peaks never mix):
- prepare: 12,859 synthetic rows with orca_dpo_pairs' lengths (bench.synthetic) through the prepare stage's
  functions, phase by phase, against the article's datasets.map + apply_chat_template; and the tokenize
  stage's work on the rows prepare keeps, at the 7B recipe's length limits, against trl's row-by-row
  _prepare_dataset, which the article's way runs inside every training (bench.preparebench).
- small / large: DPO training of our train path (one 4-bit base + LoRA, cached reference log-probs from the
  reference stage, length-grouped batches) against the article's (a second 4-bit model as ref_model, trl's
  reference forward every step, random batches), same params, rows and steps (bench.training). small is the
  profile's model; large a ~0.6B random-init Mistral (bench.models) where the weights dominate memory.
  The large size stands in for the recipe (recipes/neuralhermes-2.5.yaml) and, like the recipe and the
  article's script, trains with gradient checkpointing on, on both sides (Plan.large_gradient_checkpointing;
  the small size keeps the profile's setting, off). Without it the ~2 GB of saved activations of a step,
  equal on both sides, would bury the one thing the sides differ in: the article's second 4-bit model.
- dvc: no-op `dvc status` / `dvc repro` in a copy of the reproduced checkout; with --full-repro, the whole
  `dvc repro` of the small profile in a fresh copy first (minutes, opt-in), then the no-op figures there.
  A dvc figure not measured in this run (no --full-repro, or the checkout not reproduced) is carried over
  from the previous metrics file and flagged `<key>_carried_over: 1`.

--quick: tiny sizes (2,000 prepare rows, 3 small steps, a 39M-parameter "large" model) for a smoke run.
On a machine shared with other jobs, wall times are noisy: the `_cpu` figures (process CPU seconds) are the
steadier comparison, and the load average at start and end is recorded (load_avg_1m_*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import dvcbench, report, training
from bench.report import fmt, speed
from bench.synthetic import ORCA_ROWS, synthetic_rows

REPO = Path(__file__).resolve().parents[1]
METRICS_PATH = Path("metrics/bench.json")
SECTIONS = ("prepare", "small", "large", "dvc")
DVC_KEYS = ("dvc_status_s", "dvc_status_cold_s", "dvc_repro_noop_s", "dvc_full_repro_s")


@dataclasses.dataclass(frozen=True)
class Plan:
    prepare_rows: int
    small_steps: int
    small_batch: int | None  # None: the profile's train.per_device_train_batch_size
    small_repeats: int  # runs of each side (alternating order); the fastest counts
    small_rows: int | None  # train split size (None: just the trained rows); see bench.training.compare
    large_model: str  # bench.models CLI name
    large_steps: int
    large_batch: int
    large_repeats: int
    # Both sides of the large size; None: the profile's train.gradient_checkpointing. True as in the recipe.
    large_gradient_checkpointing: bool | None


FULL = Plan(
    prepare_rows=ORCA_ROWS,
    # One whole epoch of a 1,600-row split: both sides train exactly the same 1,600 pairs, so pairs/s compares
    # equal work (a few steps would not: length grouping serves its longest mega-batch first), and 200 x 8
    # rows give length grouping its full 50-batch mega-batches, as on the real split. 200 steps average
    # out the noise of a shared machine, so each side runs once.
    small_steps=200,
    small_batch=None,
    small_repeats=1,
    small_rows=1600,
    large_model="large",
    large_steps=6,
    large_batch=4,
    large_repeats=1,
    large_gradient_checkpointing=True,
)
QUICK = Plan(
    prepare_rows=2000,
    small_steps=3,
    small_batch=4,
    small_repeats=1,
    small_rows=None,
    large_model="large-quick",
    large_steps=2,
    large_batch=2,
    large_repeats=1,
    large_gradient_checkpointing=True,
)
SYNTHETIC_SEED = 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# ---------------------------------------------------------------------------------------------------------


def run_prepare(params: Any, base_dir: Path, plan: Plan, work: Path) -> tuple[dict, dict]:
    work = work / "prepare"
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "raw.jsonl"
    with open(raw, "w", encoding="utf-8") as fh:
        for row in synthetic_rows(plan.prepare_rows, SYNTHETIC_SEED):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    params_path = training.params_json(params, work / "params.json")
    args = ["--raw", str(raw), "--base", str(base_dir), "--params", str(params_path)]
    results = {}
    for name in ("ours", "article", "tokenize"):
        log(f"  prepare: {name} ...")
        results[name] = training.run_worker(
            "bench.preparebench",
            name,
            [*args, "--work", str(work / name)],
            work / f"{name}.json",
            work / "logs" / f"{name}.log",
            tokenizers_parallelism=True,
        )
    metrics = report.prepare_metrics(results["ours"], results["article"])
    return metrics | report.tokenize_metrics(results["tokenize"]), results


def run_training(size: str, params: Any, base_dir: Path, plan: Plan, device: str, work: Path):
    steps = plan.small_steps if size == "small" else plan.large_steps
    batch = plan.small_batch if size == "small" else plan.large_batch
    batch = batch or params.train.per_device_train_batch_size
    repeats = plan.small_repeats if size == "small" else plan.large_repeats
    rows = plan.small_rows if size == "small" else None
    checkpointing = None if size == "small" else plan.large_gradient_checkpointing
    return training.compare(
        size,
        base_dir,
        params,
        steps,
        batch,
        device,
        work,
        repeats=repeats,
        rows=rows,
        gradient_checkpointing=checkpointing,
        log=log,
    )


def build_large(plan: Plan, tokenizer_dir: Path, seed: int, work: Path) -> Path:
    """The large model, built (or found in .scratch/bench) by a process of its own."""
    out = work / "large-model.txt"
    log_path = work / "logs" / "large-model.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    import subprocess

    with open(out, "w", encoding="utf-8") as fh, open(log_path, "w", encoding="utf-8") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.models", plan.large_model, str(tokenizer_dir), str(seed)],
            cwd=REPO,
            env=training.worker_env(),
            stdout=fh,
            stderr=err,
            check=False,
        )
    if proc.returncode != 0:
        raise training.BenchError(f"building the large model failed; log {log_path}")
    return Path(out.read_text(encoding="utf-8").strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The table


def training_rows(size: str, m: dict) -> list[tuple[str, str, str, str]]:
    s = f"{size}_"

    def sides(label: str, key: str, ratio: str, x_ratio: bool = False) -> tuple[str, str, str, str]:
        """A measure of both sides (`<size>_ours_<key>`, `<size>_baseline_<key>`) and their ratio."""
        value = m.get(s + ratio)
        return (
            label,
            fmt(m.get(s + "ours_" + key)),
            fmt(m.get(s + "baseline_" + key)),
            fmt(value, "x") if x_ratio else speed(value),
        )

    def above_runtime(side: str):
        return _diff(m.get(s + side + "_peak_rss_mb"), m.get(s + side + "_rss_after_import_mb"))

    # A whole epoch (split rows == trained pairs): both sides trained the same pairs, so pairs/s is equal work.
    epoch = m.get(s + "split_rows") is not None and m.get(s + "split_rows") == m.get(s + "pairs")
    rows_note = "same rows" if epoch else "unequal rows"
    rows = [
        sides("tokens/s, steps after the 1st (wall)", "steady_tokens_per_s", "steady_tokens_per_s_ratio"),
        sides("  same, per CPU-second", "steady_tokens_per_cpu_s", "steady_tokens_per_cpu_s_ratio"),
        sides("tokens/s, whole train loop incl. 1st step (wall)", "tokens_per_s", "tokens_per_s_ratio"),
        sides(
            f"pairs/s, steps after the 1st (wall; {rows_note})",
            "steady_pairs_per_s",
            "steady_pairs_per_s_ratio",
        ),
        sides(f"pairs/s, whole train loop (wall; {rows_note})", "pairs_per_s", "pairs_per_s_ratio"),
        sides("best step after the 1st, s", "best_step_s", "best_step_speedup"),
        (
            "pairs per CPU-s, ours charged its reference rows",
            fmt(m.get(s + "ours_with_reference_pairs_per_cpu_s")),
            fmt(m.get(s + "baseline_pairs_per_cpu_s")),
            speed(m.get(s + "with_reference_pairs_per_cpu_s_ratio")),
        ),
        (
            "pad fraction",
            fmt(m.get(s + "ours_pad_fraction")),
            fmt(m.get(s + "baseline_pad_fraction")),
            "",
        ),
        sides(
            "peak RSS of the training process, MB (ours/article)", "peak_rss_mb", "peak_memory_ratio", True
        ),
        sides("  during training only (ours/article)", "train_peak_rss_mb", "train_peak_memory_ratio", True),
        sides(
            "  up to the end of loading the model(s) (ours/article)",
            "load_peak_rss_mb",
            "load_peak_memory_ratio",
            True,
        ),
        (
            "  whole process above the imported runtime",
            fmt(above_runtime("ours")),
            fmt(above_runtime("baseline")),
            fmt(m.get(s + "peak_memory_above_runtime_ratio"), "x"),
        ),
    ]
    if s + "ours_peak_cuda_mb" in m:
        rows += [
            sides("peak CUDA memory allocated, MB (ours/article)", "peak_cuda_mb", "peak_memory_ratio", True),
            sides(
                "  during training only (ours/article)", "train_peak_cuda_mb", "train_peak_memory_ratio", True
            ),
        ]
    rows += [
        (
            "reference stage, s per row of the split (ours only)",
            fmt(m.get(s + "reference_s_per_row")),
            "",
            f"{fmt(m.get(s + 'reference_rows'))} rows",
        ),
        sides("processes' wall time, s (ours: reference + train)", "process_s", "process_s_ratio"),
        (
            f"{report.SWEEP_RUNS}-run sweep, CPU (1 reference + runs)",
            "",
            "",
            speed(m.get(s + f"sweep{report.SWEEP_RUNS}_cpu_speedup")),
        ),
    ]
    return rows


def _inverse(value):
    return None if not value else 1.0 / value


def _diff(a, b):
    return None if a is None or b is None else a - b


def render(metrics: dict, context: dict) -> str:
    out = []
    head = (
        f"bench ({'quick' if context.get('quick') else 'full'}) on {context.get('device')}, "
        f"{os.cpu_count()} CPU cores, load average {fmt(context.get('load_start'))} at start, "
        f"{fmt(context.get('load_end'))} at end; {fmt(metrics.get('bench_wall_s'))} s"
    )
    out.append(head)
    for size in ("small", "large"):
        if f"{size}_pairs" not in metrics:
            continue
        out.append("")
        out.append(
            f"DPO training, {size} model ({context.get(size + '_model', '')}): "
            f"{fmt(metrics.get(size + '_steps'))} steps x {fmt(metrics.get(size + '_batch_size'))} pairs, "
            f"best of {fmt(metrics.get(size + '_ours_repeats'))} run(s) per side, gradient checkpointing "
            f"{'on' if metrics.get(size + '_gradient_checkpointing') else 'off'} on both sides"
        )
        out.append(
            report.format_table(training_rows(size, metrics), ("", "ours", "article", "ours vs article"))
        )
    if "prepare_rows" in metrics:
        out.append("")
        out.append(f"prepare, {fmt(metrics.get('prepare_rows'))} orca-sized rows (seconds after imports)")
        rows = [
            (
                "whole work (ours: +validation, filters, split, write)",
                fmt(metrics.get("prepare_work_s")),
                fmt(metrics.get("prepare_article_work_s")),
                speed(_inverse(metrics.get("prepare_work_ratio"))),
            ),
            (
                "imports",
                fmt(metrics.get("prepare_import_s")),
                fmt(metrics.get("prepare_article_import_s")),
                "",
            ),
        ]
        out.append(report.format_table(rows, ("", "ours", "article", "ours vs article")))
        out.append("")
        out.append(
            f"tokenize, {fmt(metrics.get('tokenize_rows_in'))} prepared rows at the recipe's length limits, "
            f"{fmt(metrics.get('tokenize_rows'))} kept, {fmt(metrics.get('tokenize_tokens'))} tokens (seconds)"
        )
        rows = [
            (
                "token ids trl trains on (ours: the tokenize stage, once; article: trl's map, every run)",
                fmt(metrics.get("tokenize_ours_s")),
                fmt(metrics.get("tokenize_trl_s")),
                speed(metrics.get("tokenize_speedup")),
            )
        ]
        out.append(report.format_table(rows, ("", "ours", "article", "ours vs article")))
    dvc_rows = [
        (label, fmt(metrics.get(key)))
        for label, key in (
            ("dvc status, no-op (warm median)", "dvc_status_s"),
            ("dvc status, first call in the copy", "dvc_status_cold_s"),
            ("dvc repro, no-op (warm median)", "dvc_repro_noop_s"),
            ("dvc repro, whole small profile", "dvc_full_repro_s"),
        )
        if key in metrics
    ]
    if dvc_rows or context.get("dvc_error"):
        out.append("")
        out.append("DVC wall times, s")
        if dvc_rows:
            out.append(report.format_table(dvc_rows, ("", "s")))
        carried = [key for key in DVC_KEYS if metrics.get(f"{key}_carried_over")]
        if carried:
            out.append(
                f"  carried over from the previous {METRICS_PATH} (not measured this run): {', '.join(carried)}"
            )
        if context.get("dvc_error"):
            out.append(f"  not measured: {context['dvc_error']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    parser.add_argument("--full-repro", action="store_true", help="also time the whole `dvc repro` (minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--out", type=Path, default=METRICS_PATH, help="metrics file (default metrics/bench.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (worker logs and JSON)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(
            f"--only: unknown section(s) {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}"
        )

    os.chdir(REPO)
    from bench import models
    from dpo_pipeline import config

    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    params = config.load()
    device = resolve_device(args.device)
    context: dict[str, Any] = {"quick": args.quick, "device": device, "load_start": load_average()}
    metrics: dict[str, Any] = {
        "quick": float(args.quick),
        "cpu_count": os.cpu_count(),
        "gpu": float(device == "cuda"),
    }
    metrics["load_avg_1m_start"] = context["load_start"]
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    raw_results: dict[str, Any] = {}
    failures = []
    try:
        small_dir, small_origin = models.small_base(params)
        context["small_model"] = small_origin
        log(f"bench: work folder {work}; small model {small_dir} ({small_origin}); device {device}")
        if "prepare" in only:
            log("bench: prepare")
            try:
                m, raw_results["prepare"] = run_prepare(params, small_dir, plan, work)
                metrics.update(m)
            except training.BenchError as err:
                failures.append(f"prepare: {err}")
        for size in ("small", "large"):
            if size not in only:
                continue
            log(f"bench: training, {size} model")
            try:
                if size == "small":
                    base_dir = small_dir
                else:
                    base_dir = build_large(plan, small_dir, params.seed, work)
                    shape = models.LARGE if plan.large_model == "large" else models.LARGE_QUICK
                    context["large_model"] = (
                        f"random-init Mistral, {shape.parameters() / 1e6:.0f}M parameters, "
                        f"hidden {shape.hidden_size} x {shape.num_hidden_layers} layers, vocab {shape.vocab_size}"
                    )
                    metrics["large_parameters"] = shape.parameters()
                m, raw_results[size] = run_training(size, params, base_dir, plan, device, work)
                metrics.update(m)
            except training.BenchError as err:
                failures.append(f"{size}: {err}")
        if "dvc" in only:
            log("bench: dvc")
            result = dvcbench.measure(REPO, work, args.full_repro, log=log)
            context["dvc_error"] = result.pop("error", None)
            metrics.update(result)
        previous = _previous(args.out)
        for key in DVC_KEYS:  # not measured this time: keep the last measured figure, flagged
            if key not in metrics and key in previous:
                metrics[key] = previous[key]
                metrics[f"{key}_carried_over"] = 1.0
        context["load_end"] = load_average()
        metrics["load_avg_1m_end"] = context["load_end"]
        metrics["bench_wall_s"] = time.perf_counter() - started
        from dpo_pipeline.io import write_json

        write_json(args.out, report.flat_numeric(metrics))
        (work / "raw_results.json").write_text(
            json.dumps(raw_results, indent=1, sort_keys=True), encoding="utf-8"
        )
        print(render(metrics, context))
        print(f"\nwrote {args.out}" + (f"; worker logs and raw results in {work}" if args.keep else ""))
        for failure in failures:
            print(f"FAILED {failure}", file=sys.stderr)
        return 1 if failures else 0
    finally:
        if args.keep or failures:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _previous(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())
