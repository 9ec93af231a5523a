"""The raw sample generator: schema, determinism, quirks, and a preference that is in the text, not the length."""

from __future__ import annotations

import collections
import json
import math
import re
import subprocess
import sys

import pytest

from tools.make_raw_sample import generate_rows, quirk_counts, to_jsonl

COLUMNS = ["system", "question", "chosen", "rejected"]
SHIPPED = "data/raw/orca_dpo_sample.jsonl"


@pytest.fixture(scope="module")
def rows():
    return generate_rows(3000, seed=1234)


def _clean(rows):
    """Pairs without the injected quirks (blank answers, chosen == rejected)."""
    return [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]


def test_schema_exact_keys_and_strings(rows):
    assert len(rows) == 3000
    for row in rows:
        assert list(row) == COLUMNS
        assert all(isinstance(row[c], str) for c in COLUMNS)
        assert row["question"].strip()


def test_deterministic_and_seed_dependent():
    assert to_jsonl(generate_rows(300, 5)) == to_jsonl(generate_rows(300, 5))
    assert to_jsonl(generate_rows(300, 5)) != to_jsonl(generate_rows(300, 6))


def test_shipped_file_is_what_the_script_writes(repo_root, tmp_path):
    out = tmp_path / "sample.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.make_raw_sample",
            "--rows",
            "3000",
            "--seed",
            "1234",
            "--out",
            str(out),
        ],
        cwd=repo_root,
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == (repo_root / SHIPPED).read_bytes()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3000
    assert list(json.loads(lines[0])) == COLUMNS


def test_empty_system_share_is_about_thirty_percent(rows):
    share = sum(r["system"] == "" for r in rows) / len(rows)
    assert 0.25 <= share <= 0.35
    assert len({r["system"] for r in rows}) > 5  # several orca-style system prompts


def test_quirks_for_the_content_filters(rows):
    expected = quirk_counts(3000)
    texts = [tuple(r.values()) for r in rows]
    duplicates = len(texts) - len(set(texts))
    assert duplicates == expected["duplicate"] >= 1
    assert sum(r["chosen"] == r["rejected"] for r in rows) == expected["chosen_equals_rejected"] >= 1
    blank = sum(not r["chosen"].strip() or not r["rejected"].strip() for r in rows)
    assert blank == expected["blank_answer"] >= 1
    # Small samples (the test fixture's 200 rows) carry each quirk too.
    small = generate_rows(200, seed=7)
    assert len({tuple(r.values()) for r in small}) < len(small)
    assert any(r["chosen"] == r["rejected"] for r in small)
    assert any(not r["chosen"].strip() for r in small)


def test_chosen_and_rejected_have_similar_lengths(rows):
    pairs = _clean(rows)
    chosen = [len(r["chosen"]) for r in pairs]
    rejected = [len(r["rejected"]) for r in pairs]
    mean_c, mean_r = sum(chosen) / len(chosen), sum(rejected) / len(rejected)
    assert abs(mean_c - mean_r) / mean_r < 0.05
    longer = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert 0.40 <= longer <= 0.60


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_bag_of_words_separates_chosen_from_rejected(rows):
    """A unigram naive Bayes trained on half the pairs tells chosen from rejected on the other half."""
    pairs = _clean(rows)
    train, test = pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]
    counts = {"chosen": collections.Counter(), "rejected": collections.Counter()}
    for row in train:
        for label in counts:
            counts[label].update(_words(row[label]))
    vocab = set(counts["chosen"]) | set(counts["rejected"])
    totals = {label: sum(c.values()) + len(vocab) for label, c in counts.items()}

    def score(text: str) -> float:  # log P(text | chosen) - log P(text | rejected), add-one smoothing
        return sum(
            math.log((counts["chosen"][w] + 1) / totals["chosen"])
            - math.log((counts["rejected"][w] + 1) / totals["rejected"])
            for w in _words(text)
        )

    accuracy = sum(score(r["chosen"]) > score(r["rejected"]) for r in test) / len(test)
    assert accuracy > 0.9


def test_chosen_stays_on_the_question_topic(rows):
    """The chosen answer shares more capitalised entity words with the question than the rejected one."""
    pairs = _clean(rows)

    def entities(text: str) -> set[str]:
        return set(re.findall(r"\b[A-Z][a-z]+\b", text)) | {w for w in _words(text) if len(w) > 3}

    wins = ties = 0
    for row in pairs:
        question = entities(row["question"])
        c = len(question & entities(row["chosen"]))
        r = len(question & entities(row["rejected"]))
        wins += c > r
        ties += c == r
    assert wins / len(pairs) > 0.6
    assert (wins + ties) / len(pairs) > 0.95


def test_prompts_are_short(rows):
    assert max(len(r["system"]) + len(r["question"]) for r in rows) < 700
    assert max(len(r["chosen"]) for r in rows) < 300
