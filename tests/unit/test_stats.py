"""Issue 16: the uncertainty of a delta. Constructed pairs of "models" (per-document results) whose difference
is noise must not be called significant; one with a real difference must."""

from __future__ import annotations

import math
import random

import pytest

from dpo_pipeline.evaluate import stats


def exact_mcnemar(b: int, c: int) -> float:
    """The two-sided binomial test by enumeration, for small counts."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("b", "c"), [(6, 0), (0, 6), (5, 5), (10, 3), (1, 0), (0, 0), (30, 12)])
def test_mcnemar_is_the_exact_binomial_test(b, c):
    assert stats.mcnemar_p(b, c) == pytest.approx(exact_mcnemar(b, c) if b + c else 1.0, rel=1e-9)


def test_mcnemar_works_for_thousands_of_documents():
    assert stats.mcnemar_p(5000, 5000) == pytest.approx(1.0)
    assert stats.mcnemar_p(5200, 4800) < 0.01 < stats.mcnemar_p(5050, 4950)


def models(n: int, base_rate: float, gain: float, seed: int) -> tuple[list[float], list[float]]:
    """Per-document 0/1 results of a base and a tuned model on the same n documents: the tuned model fixes a
    `gain` share of the base's errors; its other answers are the base's with the same random flips both ways."""
    rng = random.Random(seed)
    base = [float(rng.random() < base_rate) for _ in range(n)]
    tuned = []
    for b in base:
        if not b and rng.random() < gain:
            tuned.append(1.0)
        elif rng.random() < 0.1:  # noise: 10% of the documents flip, in either direction
            tuned.append(1.0 - b)
        else:
            tuned.append(b)
    return tuned, base


def test_noise_is_not_significant_and_a_real_gain_is():
    level = 0.05
    false_alarms = sum(stats.paired(*models(400, 0.5, 0.0, seed))["p_value"] < level for seed in range(200))
    assert false_alarms <= 20  # about 5% expected of 200 noise-only comparisons
    found = sum(stats.paired(*models(400, 0.5, 0.3, seed))["p_value"] < level for seed in range(50))
    assert found == 50


def test_paired_figures():
    tuned, base = [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]
    out = stats.paired(tuned, base)
    assert out["delta"] == pytest.approx(0.25)
    assert (out["discordant_tuned"], out["discordant_base"]) == (2.0, 1.0)
    assert out["delta_stderr"] == pytest.approx(math.sqrt(((0.75**2) * 2 + 0.25**2 + 1.25**2) / 3) / 2)
    assert out["p_value"] == pytest.approx(exact_mcnemar(2, 1))
    # a non-0/1 metric (answer lengths) gets the normal test on the differences
    lengths = stats.paired([10.0, 12.0, 11.0, 13.0], [20.0, 21.0, 19.0, 22.0])
    assert lengths["delta"] == pytest.approx(-9.0) and lengths["p_value"] < 1e-6
    with pytest.raises(ValueError, match="same documents"):
        stats.paired([1.0], [1.0, 0.0])


def test_independent_scores_combine_their_standard_errors():
    out = stats.independent(0.05, 0.03, 0.04)
    assert out["delta_stderr"] == pytest.approx(0.05)
    assert out["p_value"] == pytest.approx(math.erfc(1 / math.sqrt(2)))  # z = 1
    assert stats.independent(0.2, 0.03, 0.04)["p_value"] < 0.001
    assert stats.independent(0.0, 0.0, 0.0)["p_value"] == 1.0


def test_length_buckets_and_the_length_controlled_accuracy():
    assert stats.length_bucket("a long answer", "short") == "chosen_longer"
    assert stats.length_bucket("short", "a long answer") == "chosen_shorter"
    assert stats.length_bucket("same", "size") is None
    values = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    buckets = ["chosen_longer", "chosen_longer", "chosen_longer", "chosen_shorter", "chosen_shorter", None]
    out = stats.bucket_accuracy(values, buckets)
    assert out == {
        "chosen_longer": pytest.approx(2 / 3),
        "chosen_shorter": 0.5,
        "length_controlled": pytest.approx((2 / 3 + 0.5) / 2),
    }
    assert "length_controlled" not in stats.bucket_accuracy([1.0], ["chosen_longer"])
    assert stats.length_summary([3, 1, 2, 10]) == {"mean": 4.0, "median": 2.5}
