"""Pure helpers of the benchmark: the flat metrics derived from the workers' measurements, and the table.

Every function here takes plain dicts and returns plain dicts or text, so it is unit-tested without
models or subprocesses (tests/unit/test_bench.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

SWEEP_RUNS = 4  # runs of a hypothetical beta / learning-rate sweep that share one cached reference


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or not a positive finite denominator."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return None
    return numerator / denominator


def per_second(count: float | None, seconds: float | None) -> float | None:
    return ratio(count, seconds)


def flat_numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the finite numbers (bools excluded), as floats, sorted by key: what metrics/bench.json holds."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return dict(sorted(out.items()))


def training_metrics(
    size: str, ours: Mapping[str, Any], baseline: Mapping[str, Any], reference: Mapping[str, Any]
) -> dict[str, float | None]:
    """Flat metrics of one model size from the three workers' results (bench.trainbench JSON).

    Each time figure comes twice: wall-clock seconds, and process CPU seconds (`_cpu`: all threads of the
    process; competing processes disturb it less than wall time, but do inflate it through spinning
    threads and shared caches).
    - train-alone: pairs/s and tokens/s (non-pad tokens) of the whole training loop (trainer.train());
      `steady`: over the steps after the first (the first carries one-off warm-up work, seconds on both
      sides, which a 200-step run amortises); the median and the best step after the first. In a short run
      the two sides train different rows (length grouping starts with a mega-batch's longest rows), so
      pairs/s compares unequal work; tokens/s does not, and over a whole epoch (same rows, same tokens) the
      pairs/s ratio equals the tokens/s ratio: `steady_tokens_per_s_ratio` is the headline;
    - with reference: ours charged with the reference stage's compute (model load, tokenization and forward
      pass, per row of the split) for the rows it trained, against the baseline's training loop, which does
      its reference forward inside the loop;
    - process: the wall time of every process involved (ours = reference + train process), imports and
      loading included;
    - memory: peak RSS of each process (CPU) or peak CUDA memory, and the ratio ours / baseline of the
      training processes; `train_peak_*`: the training phase's own peak (reset after loading, so the resident
      model(s) plus what training adds, without loading transients); `*_above_runtime` subtracts the RSS
      right after the imports (the Python runtime), leaving what the model, data and training add;
      `load_peak_rss_mb`: the peak RSS up to the end of model loading (the policy, and for the baseline its
      second model too), so the table shows whether loading or training sets a side's whole-process peak
      (transformers maps the safetensors checkpoint for the whole load, so a load peak includes its full
      size as file-backed RSS);
    - sweep: SWEEP_RUNS training runs sharing one reference (CPU seconds of the loops plus the reference's
      per-row cost for the rows trained).
    """
    s = f"{size}_"
    m: dict[str, float | None] = {}
    pairs = ours.get("pairs")
    m[s + "pairs"] = pairs
    m[s + "steps"] = ours.get("steps")
    for name, run in (("ours", ours), ("baseline", baseline)):
        m[f"{s}{name}_repeats"] = run.get("repeats")
        for clock in ("", "_cpu"):
            seconds = run.get(f"train{clock}_s")
            m[f"{s}{name}_train{clock}_s"] = seconds
            m[f"{s}{name}_pairs_per{clock}_s"] = per_second(run.get("pairs"), seconds)
            m[f"{s}{name}_tokens_per{clock}_s"] = per_second(run.get("tokens"), seconds)
            m[f"{s}{name}_steady_pairs_per{clock}_s"] = per_second(
                run.get("later_pairs"), run.get(f"later_steps{clock}_s")
            )
            m[f"{s}{name}_steady_tokens_per{clock}_s"] = per_second(
                run.get("later_tokens"), run.get(f"later_steps{clock}_s")
            )
            m[f"{s}{name}_median_step{clock}_s"] = run.get(f"median_later_step{clock}_s")
            m[f"{s}{name}_best_step{clock}_s"] = run.get(f"best_later_step{clock}_s")
        m[f"{s}{name}_pad_fraction"] = run.get("pad_fraction")
        m[f"{s}{name}_load_s"] = run.get("load_s")
        m[f"{s}{name}_peak_rss_mb"] = run.get("peak_rss_mb")
        m[f"{s}{name}_train_peak_rss_mb"] = run.get("train_peak_rss_mb")
        m[f"{s}{name}_load_peak_rss_mb"] = run.get("rss_after_load_mb")
        m[f"{s}{name}_rss_after_import_mb"] = run.get("rss_after_import_mb")
        if "peak_cuda_mb" in run:
            m[f"{s}{name}_peak_cuda_mb"] = run.get("peak_cuda_mb")
            m[f"{s}{name}_train_peak_cuda_mb"] = run.get("train_peak_cuda_mb")
    m[s + "reference_compute_s"] = reference.get("compute_s")
    m[s + "reference_rows"] = reference.get("rows")
    m[s + "reference_s_per_row"] = ratio(reference.get("compute_s"), reference.get("rows"))
    m[s + "reference_compute_cpu_s"] = reference.get("compute_cpu_s")
    m[s + "reference_peak_rss_mb"] = reference.get("peak_rss_mb")
    for clock in ("", "_cpu"):
        m[f"{s}pairs_per{clock}_s_ratio"] = ratio(
            m[f"{s}ours_pairs_per{clock}_s"], m[f"{s}baseline_pairs_per{clock}_s"]
        )
        m[f"{s}tokens_per{clock}_s_ratio"] = ratio(
            m[f"{s}ours_tokens_per{clock}_s"], m[f"{s}baseline_tokens_per{clock}_s"]
        )
        m[f"{s}steady_pairs_per{clock}_s_ratio"] = ratio(
            m[f"{s}ours_steady_pairs_per{clock}_s"], m[f"{s}baseline_steady_pairs_per{clock}_s"]
        )
        m[f"{s}steady_tokens_per{clock}_s_ratio"] = ratio(
            m[f"{s}ours_steady_tokens_per{clock}_s"], m[f"{s}baseline_steady_tokens_per{clock}_s"]
        )
        m[f"{s}steady_step{clock}_speedup"] = ratio(
            baseline.get(f"median_later_step{clock}_s"), ours.get(f"median_later_step{clock}_s")
        )
        m[f"{s}best_step{clock}_speedup"] = ratio(
            baseline.get(f"best_later_step{clock}_s"), ours.get(f"best_later_step{clock}_s")
        )
        # The reference stage scores every row of the split; charge ours its cost per row for the rows
        # trained (what a stage computing exactly the rows training sees would cost).
        per_row = ratio(reference.get(f"compute{clock}_s"), reference.get("rows"))
        with_reference = _sum(_mul(pairs or 0, per_row), ours.get(f"train{clock}_s"))
        m[f"{s}ours_with_reference_pairs_per{clock}_s"] = per_second(pairs, with_reference)
        m[f"{s}with_reference_pairs_per{clock}_s_ratio"] = ratio(
            m[f"{s}ours_with_reference_pairs_per{clock}_s"], m[f"{s}baseline_pairs_per{clock}_s"]
        )
    m[s + "ours_process_s"] = _sum(reference.get("wall_s"), ours.get("wall_s"))
    m[s + "baseline_process_s"] = baseline.get("wall_s")
    m[s + "process_s_ratio"] = ratio(m[s + "baseline_process_s"], m[s + "ours_process_s"])

    cuda = "peak_cuda_mb" in ours and "peak_cuda_mb" in baseline
    memory_key = "peak_cuda_mb" if cuda else "peak_rss_mb"
    m[s + "peak_memory_ratio"] = ratio(ours.get(memory_key), baseline.get(memory_key))
    train_key = "train_peak_cuda_mb" if cuda else "train_peak_rss_mb"
    m[s + "train_peak_memory_ratio"] = ratio(ours.get(train_key), baseline.get(train_key))
    m[s + "load_peak_memory_ratio"] = ratio(ours.get("rss_after_load_mb"), baseline.get("rss_after_load_mb"))
    m[s + "peak_memory_above_runtime_ratio"] = ratio(
        _diff(ours.get("peak_rss_mb"), ours.get("rss_after_import_mb")),
        _diff(baseline.get("peak_rss_mb"), baseline.get("rss_after_import_mb")),
    )
    ref_cpu = _mul(pairs or 0, ratio(reference.get("compute_cpu_s"), reference.get("rows")))
    sweep_ours = _sum(ref_cpu, _mul(SWEEP_RUNS, ours.get("train_cpu_s")))
    m[s + f"sweep{SWEEP_RUNS}_cpu_speedup"] = ratio(_mul(SWEEP_RUNS, baseline.get("train_cpu_s")), sweep_ours)
    return m


def merge_repeats(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from repeated runs of the same worker: the fastest run's figures (train loop time is
    what competing processes can only inflate), the best step over all runs, the highest memory peaks."""
    if not runs:
        return {}
    fastest = min(runs, key=lambda r: r.get("train_s", math.inf))
    merged = dict(fastest)
    merged["repeats"] = len(runs)
    for key in ("best_later_step_s", "best_later_step_cpu_s"):
        values = [r[key] for r in runs if key in r]
        if values:
            merged[key] = min(values)
    for key in (
        "peak_rss_mb",
        "train_peak_rss_mb",
        "rss_after_load_mb",
        "peak_cuda_mb",
        "train_peak_cuda_mb",
    ):
        values = [r[key] for r in runs if key in r]
        if values:
            merged[key] = max(values)
    return merged


def prepare_metrics(ours: Mapping[str, Any], article: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat metrics of the prepare comparison (bench.preparebench JSON of ours and of the article's way)."""
    m: dict[str, float | None] = {
        "prepare_rows": ours.get("rows_in"),
        "prepare_rows_out": ours.get("rows_out"),
    }
    for key in (
        "import_s",
        "tokenizer_load_s",
        "read_validate_s",
        "prepare_table_s",
        "write_s",
        "work_s",
    ):
        m[f"prepare_{key}"] = ours.get(key)
    for key in ("import_s", "load_s", "map_s", "work_s"):
        m[f"prepare_article_{key}"] = article.get(key)
    # Whole work after imports. Ours does more (validation, filters, split, Parquet); ratio < 1: ours faster.
    m["prepare_work_ratio"] = ratio(ours.get("work_s"), article.get("work_s"))
    return m


def tokenize_metrics(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat metrics of bench.preparebench's tokenize mode: the tokenize stage's work against trl's row-by-row
    tokenization of the same strings (speedup > 1: ours faster)."""
    return {
        "tokenize_rows_in": result.get("rows_in"),
        "tokenize_rows": result.get("rows"),
        "tokenize_tokens": result.get("tokens"),
        "tokenize_trl_s": result.get("trl_s"),
        "tokenize_ours_s": result.get("ours_s"),
        "tokenize_speedup": ratio(result.get("trl_s"), result.get("ours_s")),
    }


def format_table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table: columns padded to their widest cell, first column left-aligned, others right."""
    rows = [tuple(header), *[tuple(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float | None, unit: str = "") -> str:
    """A number for the table: 3 significant figures, or '-' when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    magnitude = abs(value)
    text = f"{value:.0f}" if magnitude >= 100 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def speed(factor: float | None) -> str:
    """A speed ratio (>1: ours faster) as words: '1.50x faster' / '2.86x slower'."""
    if factor is None or not math.isfinite(factor) or factor <= 0:
        return "-"
    return f"{factor:.2f}x faster" if factor >= 1 else f"{1 / factor:.2f}x slower"


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mul(k: float, value: float | None) -> float | None:
    return None if value is None else k * value
