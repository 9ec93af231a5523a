"""Uncertainty of a base-vs-tuned delta, and the length figures DPO's length bias is read from.

Two cases, as the evaluate stage meets them:
- independent: a benchmark scored by lm-eval for each model, known only through each score's standard error.
  The delta's standard error is sqrt(se_tuned^2 + se_base^2) and its two-sided p-value the normal one. (Base and
  tuned saw the same documents, so this over-states the error: a conservative test.)
- paired: a held-out task whose per-document results the pipeline keeps for both models (the same documents,
  matched by row id). A 0/1 metric gets McNemar's exact test on the discordant documents; any other metric the
  normal test on the per-document differences. The delta's standard error is that of the mean difference.
Pure Python, no numpy: the evaluate stage imports it next to lm-eval, the unit tests without anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def normal_p(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def independent(delta: float, se_tuned: float, se_base: float) -> dict[str, float]:
    """{delta_stderr, p_value} of a delta between two independently known scores."""
    se = math.hypot(se_tuned, se_base)
    if se == 0.0:
        return {"delta_stderr": 0.0, "p_value": 1.0 if delta == 0.0 else 0.0}
    return {"delta_stderr": se, "p_value": normal_p(delta / se)}


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b documents only the tuned model got right, c only the base did."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n may be thousands of documents).
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


def paired(tuned: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """{delta, delta_stderr, p_value, discordant_tuned, discordant_base} of per-document results of the same
    documents, in the same order."""
    if len(tuned) != len(base) or not tuned:
        raise ValueError(f"paired results need the same documents: {len(tuned)} tuned vs {len(base)} base")
    diffs = [t - b for t, b in zip(tuned, base, strict=True)]
    n = len(diffs)
    delta = sum(diffs) / n
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    binary = all(v in (0.0, 1.0) for v in (*tuned, *base))
    only_tuned = sum(1 for d in diffs if d > 0)
    only_base = sum(1 for d in diffs if d < 0)
    if binary:
        p = mcnemar_p(only_tuned, only_base)
    elif se == 0.0:
        p = 1.0 if delta == 0.0 else 0.0
    else:
        p = normal_p(delta / se)
    return {
        "delta": delta,
        "delta_stderr": se,
        "p_value": p,
        "discordant_tuned": float(only_tuned),
        "discordant_base": float(only_base),
    }


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """{mean, median} of generated lengths (tokens)."""
    if not lengths:
        return {}
    return {"mean": float(statistics.fmean(lengths)), "median": float(statistics.median(lengths))}


LENGTH_BUCKETS = ("chosen_longer", "chosen_shorter")


def length_bucket(chosen: str, rejected: str) -> str | None:
    """Which bucket a preference pair is in by its answers' lengths in characters (None for equal lengths)."""
    if len(chosen) == len(rejected):
        return None
    return "chosen_longer" if len(chosen) > len(rejected) else "chosen_shorter"


def bucket_accuracy(values: Sequence[float], buckets: Sequence[str | None]) -> dict[str, Any]:
    """Mean of a per-document metric in each length bucket, and `length_controlled`: the mean of the two
    buckets' means (what the accuracy would be if chosen answers were longer exactly half the time)."""
    out: dict[str, Any] = {}
    for name in LENGTH_BUCKETS:
        picked = [v for v, b in zip(values, buckets, strict=True) if b == name]
        if picked:
            out[name] = sum(picked) / len(picked)
    if len(out) == len(LENGTH_BUCKETS):
        out["length_controlled"] = sum(out[name] for name in LENGTH_BUCKETS) / len(LENGTH_BUCKETS)
    return out
