"""Tuned vs base: score deltas, comparable settings, the held-out documents paired one by one, uncertainty."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.tasks import heldout_task_names

# Settings that must be equal between eval_base.json and this run for base-vs-tuned deltas to mean anything.
COMPARABLE_META = ("lm_eval_version", "seed", "batch_size", "limit", "dtype", "num_fewshot")

# The Open LLM Leaderboard v1 suite: when all six are scored, their mean is reported on its own as well
# ("open_llm_v1/average"), the figure the article compares, apart from the average over every task.
LEADERBOARD_V1 = ("arc_challenge", "hellaswag", "truthfulqa_mc2", "mmlu", "winogrande", "gsm8k")


def add_averages(
    scores: dict[str, float], primary: dict[str, str], source: str = "scores"
) -> dict[str, float]:
    """`scores` plus "average" of each task's primary metric (`primary`: task -> flat key), and
    "open_llm_v1/average" when the whole Open LLM Leaderboard v1 suite is among them."""
    missing = [key for key in primary.values() if key not in scores]
    if missing:
        raise StageError(f"{source}: no {', '.join(missing)} to average (scored with other tasks?)")
    out = dict(scores)
    if primary:
        values = [scores[key] for key in primary.values()]
        out["average"] = round(sum(values) / len(values), 6)
    if all(task in primary for task in LEADERBOARD_V1):
        suite = [scores[primary[task]] for task in LEADERBOARD_V1]
        out["open_llm_v1/average"] = round(sum(suite) / len(suite), 6)
    return out


def compare_scores(tuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Tuned values under their own keys, the base model's under `<key>_base`, and `<key>_delta`."""
    out: dict[str, float] = {}
    for key, value in tuned.items():
        out[key] = value
        if key in base:
            out[f"{key}_base"] = base[key]
            if not key.endswith("_stderr"):
                out[f"{key}_delta"] = round(value - base[key], 6)
    return out


def check_comparable(
    meta: dict[str, Any], base_meta: dict[str, Any], base_file: str | Path, stage: str = "evaluate_base"
) -> None:
    for key in COMPARABLE_META:
        if meta.get(key) != base_meta.get(key):
            raise StageError(
                f"{base_file}: meta.{key} is {base_meta.get(key)!r} but this run uses {meta.get(key)!r}; "
                f"the base scores were made with other settings (run `dvc repro {stage}`)"
            )


def heldout_documents(
    results: dict[str, Any], names: list[str], tasks_dir: str | Path, tokenizer
) -> dict[str, dict[str, Any]]:
    """Per-document results of the held-out tasks, sorted by row id: {task: {"ids", "metrics": {metric: [..]},
    "buckets" (multiple choice: which of chosen/rejected is longer), "lengths" (generation: answer tokens)}}.
    Kept for both models, so their deltas can be tested document by document."""
    from dpo_pipeline.evaluate.stats import length_bucket

    heldout = heldout_task_names(tasks_dir)
    out: dict[str, dict[str, Any]] = {}
    for task in names:
        if task not in heldout:
            continue
        samples = sorted((results.get("samples") or {}).get(task, []), key=lambda s: str(s["doc"]["id"]))
        if not samples:
            raise StageError(f"lm-eval logged no per-document results for {task!r}")
        entry: dict[str, Any] = {"ids": [str(s["doc"]["id"]) for s in samples], "metrics": {}}
        for metric in samples[0]["metrics"]:
            values = [s.get(metric) for s in samples]
            if all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values):
                entry["metrics"][metric] = [float(v) for v in values]
        first = samples[0]["filtered_resps"][0]
        if isinstance(first, str):  # a generation task: the answers' lengths in tokens
            entry["lengths"] = [
                len(tokenizer(s["filtered_resps"][0], add_special_tokens=False)["input_ids"]) for s in samples
            ]
        else:
            entry["buckets"] = [length_bucket(s["doc"]["chosen"], s["doc"]["rejected"]) for s in samples]
        out[task] = entry
    return out


def document_figures(documents: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat figures from per-document results: each multiple-choice metric by length bucket (chosen answer
    longer / shorter, and their mean, the length-controlled figure); each generation task's answer lengths."""
    from dpo_pipeline.evaluate.stats import bucket_accuracy, length_summary

    out: dict[str, float] = {}
    for task, entry in documents.items():
        if "buckets" in entry:
            for metric, values in entry["metrics"].items():
                for bucket, value in bucket_accuracy(values, entry["buckets"]).items():
                    out[f"{task}/{metric}_{bucket}"] = round(value, 6)
        for name, value in length_summary(entry.get("lengths", [])).items():
            out[f"{task}/length_{name}_tokens"] = round(value, 6)
    return out


def bucket_counts(documents: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    from collections import Counter

    return {
        task: dict(sorted(Counter(b or "same_length" for b in entry["buckets"]).items()))
        for task, entry in documents.items()
        if "buckets" in entry
    }


def add_uncertainty(
    scores: dict[str, float],
    primary: dict[str, str],
    tuned_docs: dict[str, dict[str, Any]],
    base_docs: dict[str, dict[str, Any]],
    level: float,
    source: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """`scores` (compare_scores' output) plus, for every delta, `_delta_stderr`, `_p_value` and `_significant`
    (1.0 when p < `level`); returns them and how each task's deltas were tested.

    Held-out tasks are paired (their per-document results, the same row ids for both models: McNemar for 0/1
    metrics), their length buckets too; other tasks combine lm-eval's two standard errors; the averages
    combine their tasks' delta standard errors as independent."""
    from dpo_pipeline.evaluate.stats import LENGTH_BUCKETS, independent, normal_p, paired

    out = dict(scores)
    methods: dict[str, str] = {}

    def put(key: str, figures: dict[str, float]) -> None:
        out[f"{key}_delta_stderr"] = round(figures["delta_stderr"], 6)
        out[f"{key}_p_value"] = round(figures["p_value"], 6)
        out[f"{key}_significant"] = 1.0 if figures["p_value"] < level else 0.0

    for task, entry in tuned_docs.items():
        other = base_docs.get(task)
        if other is None or other["ids"] != entry["ids"]:
            raise StageError(
                f"{source}: the base's per-document results for {task} are not of the same documents "
                f"({0 if other is None else len(other['ids'])} vs {len(entry['ids'])} rows; run `dvc repro "
                "evaluate_base_heldout`)"
            )
        methods[task] = f"paired over {len(entry['ids'])} documents (McNemar exact for 0/1 metrics)"
        key = f"{task}/length_mean_tokens"
        if "lengths" in entry and "lengths" in other and f"{key}_delta" in out:
            put(key, paired([float(x) for x in entry["lengths"]], [float(x) for x in other["lengths"]]))
        for metric, values in entry["metrics"].items():
            if metric not in other["metrics"]:
                continue
            key = f"{task}/{metric}"
            if f"{key}_delta" in out:
                put(key, paired(values, other["metrics"][metric]))
            for bucket in LENGTH_BUCKETS if "buckets" in entry else ():
                picked = [i for i, b in enumerate(entry["buckets"]) if b == bucket]
                if picked and f"{key}_{bucket}_delta" in out:
                    put(
                        f"{key}_{bucket}",
                        paired([values[i] for i in picked], [other["metrics"][metric][i] for i in picked]),
                    )
    for key in list(scores):
        if not key.endswith("_delta") or f"{key[: -len('_delta')]}_delta_stderr" in out:
            continue
        name = key[: -len("_delta")]
        task = name.split("/", 1)[0]
        se_t, se_b = scores.get(f"{name}_stderr"), scores.get(f"{name}_stderr_base")
        if se_t is not None and se_b is not None:
            put(name, independent(scores[key], se_t, se_b))
            methods.setdefault(task, "independent (lm-eval's standard errors combined)")
    for average, tasks in (("average", list(primary)), ("open_llm_v1/average", list(LEADERBOARD_V1))):
        keys = [primary.get(t) for t in tasks]
        if f"{average}_delta" not in out or not all(k and f"{k}_delta_stderr" in out for k in keys):
            continue
        se = math.sqrt(sum(out[f"{k}_delta_stderr"] ** 2 for k in keys)) / len(keys)
        delta = out[f"{average}_delta"]
        p = normal_p(delta / se) if se > 0 else (1.0 if delta == 0 else 0.0)
        put(average, {"delta_stderr": se, "p_value": p})
    return out, methods
