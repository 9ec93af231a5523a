"""The benchmark's pure parts: derived metrics, ratios, the table, the synthetic orca rows, and the
model-size arithmetic. No model is trained and no subprocess is started."""

from __future__ import annotations

import math
import statistics

import pytest

from bench import report, synthetic
from bench.models import LARGE, Shape


def test_ratio_and_per_second_refuse_missing_or_zero():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(1.0, float("nan")) is None
    assert report.per_second(10, 4.0) == 2.5


def test_flat_numeric_keeps_finite_numbers_only_sorted():
    flat = report.flat_numeric({"b": 2, "a": 1.5, "s": "text", "n": None, "nan": float("nan"), "t": True})
    assert flat == {"a": 1.5, "b": 2.0}
    assert list(flat) == ["a", "b"]


def _worker(train_s, cpu_s, pairs=40, tokens=4000, peak=900.0, after_import=400.0, step=1.0, step_cpu=2.0):
    return {
        "later_pairs": pairs - 4,
        "later_tokens": tokens - 400,
        "later_steps_s": train_s / 2,
        "later_steps_cpu_s": cpu_s / 2,
        "best_later_step_s": step / 2,
        "train_peak_rss_mb": peak - 100,
        "train_s": train_s,
        "train_cpu_s": cpu_s,
        "pairs": pairs,
        "tokens": tokens,
        "peak_rss_mb": peak,
        "rss_after_import_mb": after_import,
        "median_later_step_s": step,
        "median_later_step_cpu_s": step_cpu,
        "pad_fraction": 0.2,
        "load_s": 3.0,
        "wall_s": train_s + 10,
    }


def test_training_metrics_ratios_and_reference_charging():
    ours = _worker(10.0, 20.0, peak=800.0, step=1.0, step_cpu=2.0)
    baseline = _worker(20.0, 40.0, peak=1200.0, step=2.0, step_cpu=4.0)
    reference = {"compute_s": 10.0, "compute_cpu_s": 20.0, "peak_rss_mb": 700.0, "wall_s": 8.0, "rows": 80}
    m = report.training_metrics("small", ours, baseline, reference)
    assert m["small_ours_pairs_per_s"] == 4.0
    assert m["small_baseline_pairs_per_s"] == 2.0
    assert m["small_pairs_per_s_ratio"] == 2.0
    assert m["small_pairs_per_cpu_s_ratio"] == 2.0
    assert m["small_tokens_per_s_ratio"] == 2.0
    assert m["small_steady_step_cpu_speedup"] == 2.0
    assert m["small_ours_steady_pairs_per_s"] == pytest.approx(36 / 5)
    assert m["small_steady_pairs_per_s_ratio"] == pytest.approx(2.0)
    assert m["small_best_step_speedup"] == pytest.approx(2.0)
    assert m["small_ours_steady_tokens_per_s"] == pytest.approx(3600 / 5)
    assert m["small_steady_tokens_per_s_ratio"] == pytest.approx(2.0)
    # Ours pays the reference stage's compute per row for the 40 rows trained: 40 pairs / (5 + 10) s,
    # against the baseline's 2 pairs/s.
    assert m["small_ours_with_reference_pairs_per_s"] == pytest.approx(40 / 15)
    assert m["small_with_reference_pairs_per_s_ratio"] == pytest.approx(40 / 15 / 2)
    assert m["small_peak_memory_ratio"] == pytest.approx(800 / 1200)
    assert m["small_peak_memory_above_runtime_ratio"] == pytest.approx(400 / 800)
    assert m["small_train_peak_memory_ratio"] == pytest.approx(700 / 1100)
    # Processes: reference (8 s) + ours (20 s) against the baseline's 30 s.
    assert m["small_process_s_ratio"] == pytest.approx(30 / 28)
    # Sweep of 4: baseline 4 x 40 CPU-s against one reference (10) + 4 x 20.
    assert m[f"small_sweep{report.SWEEP_RUNS}_cpu_speedup"] == pytest.approx(160 / 90)


def test_training_metrics_prefer_cuda_memory_when_both_have_it():
    ours = _worker(10.0, 20.0) | {"peak_cuda_mb": 6000.0, "train_peak_cuda_mb": 5000.0}
    baseline = _worker(20.0, 40.0) | {"peak_cuda_mb": 10000.0, "train_peak_cuda_mb": 9000.0}
    m = report.training_metrics(
        "large", ours, baseline, {"compute_s": 1.0, "compute_cpu_s": 1.0, "wall_s": 2.0}
    )
    assert m["large_peak_memory_ratio"] == pytest.approx(0.6)
    assert m["large_ours_peak_cuda_mb"] == 6000.0
    assert m["large_train_peak_memory_ratio"] == pytest.approx(5000 / 9000)


def test_training_metrics_missing_values_give_none_not_errors():
    m = report.training_metrics("small", {}, {}, {})
    assert m["small_pairs_per_s_ratio"] is None
    assert report.flat_numeric(m) == {}


def test_merge_repeats_keeps_the_fastest_run_the_best_step_and_the_highest_peak():
    slow = {"train_s": 20.0, "best_later_step_s": 0.5, "peak_rss_mb": 900.0, "pairs": 40}
    fast = {"train_s": 10.0, "best_later_step_s": 0.7, "peak_rss_mb": 800.0, "pairs": 40}
    merged = report.merge_repeats([slow, fast])
    assert merged["train_s"] == 10.0 and merged["repeats"] == 2
    assert merged["best_later_step_s"] == 0.5
    assert merged["peak_rss_mb"] == 900.0
    assert report.merge_repeats([]) == {}
    assert report.merge_repeats([slow])["repeats"] == 1


def test_prepare_metrics_ratios():
    ours = {"work_s": 0.4, "rows_in": 100, "rows_out": 90}
    article = {"map_s": 1.5, "work_s": 2.0}
    m = report.prepare_metrics(ours, article)
    assert m["prepare_work_ratio"] == pytest.approx(0.2)
    assert m["prepare_work_s"] == 0.4 and m["prepare_article_map_s"] == 1.5
    assert m["prepare_rows"] == 100 and m["prepare_rows_out"] == 90
    assert report.prepare_metrics({}, article)["prepare_work_ratio"] is None


def test_tokenize_metrics_speedup():
    m = report.tokenize_metrics({"rows_in": 12, "rows": 10, "tokens": 500, "trl_s": 3.0, "ours_s": 1.5})
    assert m["tokenize_speedup"] == pytest.approx(2.0)
    assert m["tokenize_rows"] == 10 and m["tokenize_rows_in"] == 12 and m["tokenize_tokens"] == 500
    assert report.tokenize_metrics({})["tokenize_speedup"] is None


def test_format_table_aligns_columns():
    text = report.format_table([("pairs/s", "1.5", "12.25"), ("peak", "100", "7")], ("", "ours", "article"))
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("-------")
    # Right-aligned numeric columns end at the same place.
    assert lines[2].endswith("12.25") and lines[3].endswith("    7")
    assert len({len(line) for line in lines}) == 1


def test_fmt_and_speed():
    assert report.fmt(None) == "-"
    assert report.fmt(float("nan")) == "-"
    assert report.fmt(1234.5) == "1234"  # banker's rounding of .5 aside, no decimals above 100
    assert report.fmt(0.012345) == "0.0123"
    assert report.fmt(1.5, "x") == "1.50x"
    assert report.speed(2.0) == "2.00x faster"
    assert report.speed(0.5) == "2.00x slower"
    assert report.speed(None) == "-"


# ---------------------------------------------------------------------------------------------------------
# Synthetic orca rows


@pytest.fixture(scope="module")
def rows():
    return synthetic.synthetic_rows(1500, seed=3)


def test_synthetic_rows_shape_and_determinism(rows):
    assert len(rows) == 1500
    assert all(set(r) == {"system", "question", "chosen", "rejected"} for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert rows == synthetic.synthetic_rows(1500, seed=3)
    assert rows != synthetic.synthetic_rows(1500, seed=4)


def test_synthetic_rows_have_orca_lengths(rows):
    def median(column):
        return statistics.median(len(r[column]) for r in rows)

    # Questions of several hundred characters with a tail past a thousand, answers of several hundred.
    assert 350 <= median("question") <= 700
    assert 300 <= median("chosen") <= 650
    assert 350 <= median("rejected") <= 750
    long_questions = sum(len(r["question"]) > 1000 for r in rows) / len(rows)
    assert 0.1 <= long_questions <= 0.4
    empty_system = sum(r["system"] == "" for r in rows) / len(rows)
    assert abs(empty_system - synthetic.EMPTY_SYSTEM_SHARE) < 0.06


def test_synthetic_rows_include_the_quirks_prepare_filters(rows):
    as_tuples = [tuple(r.values()) for r in rows]
    assert len(set(as_tuples)) < len(as_tuples)  # exact duplicates
    assert any(r["chosen"] == r["rejected"] for r in rows)


def test_synthetic_default_size_is_orca():
    assert synthetic.ORCA_ROWS == 12_859


# ---------------------------------------------------------------------------------------------------------
# Token-count cache prototype


# ---------------------------------------------------------------------------------------------------------
# Model sizes


def test_shape_parameter_count_matches_transformers():
    from transformers import MistralConfig, MistralForCausalLM

    shape = Shape(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    config = MistralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


def test_large_model_is_in_the_issue_range():
    assert 0.5e9 <= LARGE.parameters() <= 1.0e9
    assert math.isclose(LARGE.vocab_size, 32_000)


# ---------------------------------------------------------------------------------------------------------
# The whole suite, at --quick sizes (about 1.5 minutes on 2 cores): the workers still fit stages.train's and
# stages.reference's interfaces, and every headline figure comes out as a finite number.


@pytest.mark.slow
def test_quick_bench_writes_the_headline_figures(tmp_path, repo_root):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "prepare,small,large", "--out", str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads(out.read_text(encoding="utf-8"))
    for key in (
        "small_pairs_per_s_ratio",
        "small_steady_tokens_per_s_ratio",
        "small_pairs_per_cpu_s_ratio",
        "small_peak_memory_ratio",
        "large_pairs_per_s_ratio",
        "large_peak_memory_ratio",
        "large_train_peak_memory_ratio",
        "prepare_work_s",
        "prepare_work_ratio",
        "tokenize_speedup",
        "tokenize_ours_s",
        "tokenize_tokens",
    ):
        assert key in metrics and math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["small_pairs"] == metrics["small_steps"] * metrics["small_batch_size"]
    assert "DPO training, small model" in proc.stdout and "prepare, 2000" in proc.stdout


def test_bench_params_override_applies_to_the_one_params_both_sides_read():
    from bench import training
    from dpo_pipeline import config

    params = config.load("params.yaml")
    assert params.train.gradient_checkpointing is False  # the small profile's setting
    kept = training.bench_params(params, steps=3, batch_size=2, device="cpu")
    assert kept.train.gradient_checkpointing is False and kept.train.max_steps == 3
    on = training.bench_params(params, steps=3, batch_size=2, device="cpu", gradient_checkpointing=True)
    assert on.train.gradient_checkpointing is True
    assert on.train.per_device_train_batch_size == 2 and on.train.save_steps > 3
