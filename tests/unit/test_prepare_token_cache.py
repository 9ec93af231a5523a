"""prepare: token counts remembered between runs, and answers counted only where the prompt fits.

Neither may change what the stage writes: the outputs with a cold cache, a warm cache and no cache are
identical, and a cache that disagrees with the tokenizer is thrown away."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import prepare
from tests.unit.test_prepare_format import data_params, random_rows, table_of


@pytest.fixture(scope="module")
def tokenizer():
    from stages import base

    texts = [" ".join(r.values()) for r in random_rows(50, seed=1)]
    return base.build_tokenizer(texts, vocab_size=300)


def cached_token_lengths(tokenizer, texts, cache_dir):
    """One stage run's use of the cache: a TokenCounter that counts `texts`, then saves."""
    counter = prepare.TokenCounter(tokenizer, cache_dir)
    lengths = counter(texts)
    counter.save()
    return lengths


def test_cached_counts_equal_fresh_counts_and_skip_seen_texts(tokenizer, tmp_path, monkeypatch):
    texts = [prepare.format_row(r, tokenizer)["prompt"] for r in random_rows(30, seed=2)]
    expected = prepare.token_lengths(tokenizer, texts)
    assert cached_token_lengths(tokenizer, texts, tmp_path) == expected
    assert len(list(tmp_path.glob("*.parquet"))) == 1

    seen = []
    real = prepare.token_lengths

    def spy(tok, batch):
        seen.append(list(batch))
        return real(tok, batch)

    monkeypatch.setattr(prepare, "token_lengths", spy)
    assert cached_token_lengths(tokenizer, texts + ["a new text"], tmp_path) == expected + real(
        tokenizer, ["a new text"]
    )
    # Only the spot check (at most CHECK_ROWS cached texts) and the one new text were tokenized.
    assert sum(len(b) for b in seen) <= prepare.CHECK_ROWS + 1
    assert ["a new text"] in seen


def test_a_wrong_cache_is_not_trusted(tokenizer, tmp_path):
    texts = ["one two three", "four five"]
    cached_token_lengths(tokenizer, texts, tmp_path)
    path = next(tmp_path.glob("*.parquet"))
    digests = pq.read_table(path)["digest"]
    pq.write_table(pa.table({"digest": digests, "tokens": pa.array([999] * len(digests), pa.int32())}), path)
    assert cached_token_lengths(tokenizer, texts, tmp_path) == prepare.token_lengths(tokenizer, texts)


def test_a_corrupt_cache_file_is_ignored(tokenizer, tmp_path):
    (tmp_path / f"{prepare.tokenizer_key(tokenizer)}.parquet").write_bytes(b"not parquet")
    assert cached_token_lengths(tokenizer, ["abc"], tmp_path) == prepare.token_lengths(tokenizer, ["abc"])


def test_tokenizer_key_changes_with_the_vocabulary(tokenizer):
    from stages import base

    other = base.build_tokenizer([" ".join(r.values()) for r in random_rows(50, seed=1)], vocab_size=320)
    assert prepare.tokenizer_key(tokenizer) != prepare.tokenizer_key(other)
    assert prepare.tokenizer_key(tokenizer) == prepare.tokenizer_key(tokenizer)


@pytest.mark.parametrize("max_prompt_length", [10_000, 40, 1])
def test_outputs_identical_with_and_without_cache(tokenizer, tmp_path, max_prompt_length):
    table = table_of(random_rows(120, seed=3))
    data = data_params(max_prompt_length=max_prompt_length, max_length=max_prompt_length + 30)
    plain = prepare.prepare_table(table, tokenizer, data)
    cold = prepare.prepare_table(table, tokenizer, data, tmp_path)
    warm = prepare.prepare_table(table, tokenizer, data, tmp_path)
    for other in (cold, warm):
        assert other[0].equals(plain[0]) and other[1].equals(plain[1]) and other[2] == plain[2]


@pytest.mark.parametrize("slack", [1000, 25])
def test_answers_are_counted_only_where_they_can_change_the_outcome(tokenizer, monkeypatch, slack):
    rows = random_rows(60, seed=4)
    table = table_of(rows)
    formatted = [prepare.format_row(r, tokenizer) for r in rows]
    lengths = prepare.token_lengths(tokenizer, [f["prompt"] for f in formatted])
    limit = sorted(lengths)[len(lengths) // 2]
    chosen = prepare.token_lengths(tokenizer, [f["chosen"] for f in formatted])
    fitting = [i for i, n in enumerate(lengths) if n <= limit]
    chosen_fits = [i for i in fitting if lengths[i] + chosen[i] <= limit + slack]
    assert 0 < len(fitting) < len(rows)
    if slack == 25:  # the tight limit really drops some rows on their chosen answer alone
        assert len(chosen_fits) < len(fitting)
    counted = []
    real = prepare.token_lengths
    monkeypatch.setattr(
        prepare, "token_lengths", lambda tok, batch: counted.extend(batch) or real(tok, batch)
    )
    data = data_params(max_prompt_length=limit, max_length=limit + slack)
    train, test, counts = prepare.prepare_table(table, tokenizer, data)
    # Every prompt; chosen where the prompt fits; rejected where prompt + chosen fits too.
    assert len(counted) == len(rows) + len(fitting) + len(chosen_fits)
    monkeypatch.setattr(prepare, "token_lengths", real)
    # Same outcome as counting everything: kept rows carry exact counts, drop reasons agree.
    kept = pa.concat_tables([train, test])
    for row in kept.to_pylist():
        assert row["rejected_tokens"] == real(tokenizer, [row["rejected"]])[0]
        assert row["prompt_tokens"] + max(row["chosen_tokens"], row["rejected_tokens"]) <= limit + slack
    rejected = prepare.token_lengths(tokenizer, [f["rejected"] for f in formatted])
    too_long = sum(lengths[i] + max(chosen[i], rejected[i]) > limit + slack for i in fitting)
    assert counts["dropped"]["too_long"] == too_long
