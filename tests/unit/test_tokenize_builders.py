"""tokenize: trl's ids of the prepared strings, the length limits and their metrics (pure builders).

That the ids equal trl's own `_prepare_dataset` output is checked against trl itself in
tests/stage/test_tokenize.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from dpo_pipeline import layout
from dpo_pipeline.data import prepare, tokens
from dpo_pipeline.data import tables as tables_lib
from dpo_pipeline.errors import StageError
from dpo_pipeline.models import builtin
from tests.unit.test_prepare_format import WORDS, random_rows, table_of

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():

    return builtin.build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)


def limits(max_prompt_length: int = 10_000, max_length: int = 20_000):
    return SimpleNamespace(max_prompt_length=max_prompt_length, max_length=max_length)


def prepared(rows, tokenizer):
    train, test, _counts = prepare.prepare_table(
        table_of(rows), tokenizer, SimpleNamespace(test_fraction=0.0)
    )
    assert test.num_rows == 0
    return train


def test_strip_turn_newline():
    assert tokens.strip_turn_newline("Paris.<|im_end|>\n", EOS) == "Paris.<|im_end|>"
    assert tokens.strip_turn_newline("Paris.<|im_end|>", EOS) == "Paris.<|im_end|>"
    assert tokens.strip_turn_newline("Paris.\n", EOS) == "Paris.\n"


def test_ids_are_the_tokenizers_and_split_where_the_answer_starts(tokenizer):
    table = prepared(random_rows(12, seed=3), tokenizer)
    out, counts = tokens.tokenize_split(table, tokenizer, limits())
    assert counts == {"contaminated": 0, "prompt_too_long": 0, "too_long": 0}
    assert out.column_names == list(layout.TOKENIZED_COLUMNS)
    assert out["id"].to_pylist() == table["id"].to_pylist()  # every row, in the prepared order
    assert out.schema.field("prompt_ids").type == pa.list_(pa.int32())
    for row, ids in zip(table.to_pylist(), out.to_pylist(), strict=True):
        chosen = tokens.strip_turn_newline(row["chosen"], EOS)
        assert chosen.endswith(EOS)
        joint = tokenizer(text=row["prompt"] + chosen)["input_ids"]
        assert ids["prompt_ids"] + ids["chosen_ids"] == joint
        assert (
            ids["prompt_ids"] == tokenizer(text=row["prompt"])["input_ids"]
        )  # ChatML ends on a special token
        answers = max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
        assert ids["length"] == len(ids["prompt_ids"]) + answers


def test_length_limits_drop_and_count_each_reason_once(tokenizer):
    rows = random_rows(20, seed=4)
    long_text = " ".join(["the of and"] * 60)
    rows += [
        dict(rows[0], question=long_text),  # prompt_too_long
        dict(rows[1], question=long_text, chosen=long_text),  # prompt_too_long (first reason), too_long too
        dict(rows[2], chosen=long_text),  # too_long via chosen
        dict(rows[3], rejected=long_text),  # too_long via rejected
    ]
    table = prepared(rows, tokenizer)
    everything, _ = tokens.tokenize_split(table, tokenizer, limits())
    lengths = tokens.token_lengths(everything)
    normal = max(everything["length"].to_pylist()[:20])
    longest_prompt = max(lengths["prompt"].to_pylist()[:20])
    data = limits(max_prompt_length=longest_prompt, max_length=normal)

    out, counts = tokens.tokenize_split(table, tokenizer, data)
    assert counts == {"contaminated": 0, "prompt_too_long": 2, "too_long": 2}
    assert out["id"].to_pylist() == table["id"].to_pylist()[:20]
    kept = tokens.token_lengths(out)
    assert max(kept["prompt"].to_pylist()) <= data.max_prompt_length
    assert max(out["length"].to_pylist()) <= data.max_length

    metrics = tokens.token_metrics({"train": out, "test": out.slice(0, 3)}, {"train": counts, "test": counts})
    assert metrics["rows_train"] == 20 and metrics["rows_test"] == 3
    assert metrics["dropped_prompt_too_long"] == 4 and metrics["dropped_too_long"] == 4
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    for name in ("prompt", "chosen", "rejected"):
        values = kept[name].to_pylist() + kept[name].to_pylist()[:3]
        assert metrics[f"{name}_tokens_max"] == max(values)
        assert metrics[f"{name}_tokens_p50"] <= metrics[f"{name}_tokens_p90"] <= metrics[f"{name}_tokens_p99"]


def test_a_split_left_empty_by_the_limits_stops_the_stage(tokenizer, tmp_path):
    table = prepared(random_rows(5, seed=6), tokenizer)
    data = limits(max_prompt_length=2, max_length=3)
    out, counts = tokens.tokenize_split(table, tokenizer, data)
    assert out.num_rows == 0 and counts["prompt_too_long"] == 5
    tables = {"train": out, "test": out}
    metrics = tokens.token_metrics(tables, {"train": counts, "test": counts})
    with pytest.raises(
        StageError, match=r"train\.parquet: no rows fit the length limits .*max_prompt_length=2"
    ):
        tokens.check_split(tables, metrics, tmp_path, data)


def test_read_prepared_names_the_missing_file_and_columns(tmp_path):
    import pyarrow.parquet as pq

    with pytest.raises(StageError, match=r"test\.parquet: prepared split not found.*dvc repro prepare"):
        tables_lib.read_prepared(tmp_path, "test")
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), tmp_path / "test.parquet")
    with pytest.raises(StageError, match=r"test\.parquet: missing column\(s\) chosen, rejected"):
        tables_lib.read_prepared(tmp_path, "test")
