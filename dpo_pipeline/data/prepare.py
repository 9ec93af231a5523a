"""raw table -> the prepared splits: the prepare stage's filters, ChatML formatting and split, in that order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.chatml import ANSWER_SUFFIX, format_prompt, require_chatml
from dpo_pipeline.data.filters import (
    REASONS,
    content_masks,
    digests,
    first_reason,
    is_test,
    row_id,
    special_texts,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams


def split_rows(table, data: DataParams, specials) -> tuple[dict[str, list[int]], dict[str, int], list[bytes]]:
    """Which raw rows the content filters keep and which split each goes to: ({split: row indices in input
    order}, drop counts per reason, each row's content digest). No formatting, no tokenizer (`specials` are
    its texts, filters.special_texts): cheap enough for the validate stage to run it on the whole file before
    DVC removes any output."""
    row_digests = digests(table)
    keep, counts = first_reason(content_masks(table, row_digests, specials), table.num_rows, REASONS)
    rows: dict[str, list[int]] = {"train": [], "test": []}
    for i, (digest, kept) in enumerate(zip(row_digests, keep.to_pylist(), strict=True)):
        if kept:
            rows["test" if is_test(digest, data.test_fraction) else "train"].append(i)
    return rows, counts, row_digests


def check_split_sizes(table, data: DataParams, source: str, global_batch: int, specials) -> dict[str, Any]:
    """The prepare stage's split checks (filters.check_split) on a raw table, plus enough training rows for
    one optimizer step (`global_batch` distinct pairs); returns prepare's data metrics."""
    from types import SimpleNamespace

    from dpo_pipeline.data.filters import check_split, data_metrics
    from dpo_pipeline.errors import StageError

    rows, counts, _ = split_rows(table, data, specials)
    train, test = (SimpleNamespace(num_rows=len(rows[split])) for split in ("train", "test"))
    metrics = data_metrics(train, test, {"rows_in": table.num_rows, "dropped": counts})
    check_split(train, test, metrics, source, data)
    if train.num_rows < global_batch:
        raise StageError(
            f"{source}: the train split keeps {train.num_rows} rows (data.test_fraction={data.test_fraction}), "
            f"fewer than one global batch of {global_batch} pairs; add rows or lower data.test_fraction"
        )
    return metrics


def prepare_table(table, tokenizer, data: DataParams) -> tuple[Any, Any, dict[str, Any]]:
    """Raw table (TEXT_COLUMNS) -> (train table, test table, counts) following `data` params; rows holding
    one of the tokenizer's special tokens (models.special_tokens) are dropped as `special_token`.

    Each split's rows are taken from the raw table once, in input order, and formatted there: one copy of
    the text per split, not a filtered copy and then a split copy.
    """
    import pyarrow as pa

    rows_in = table.num_rows
    from dpo_pipeline.models.loading import special_tokens

    require_chatml(tokenizer)
    rows, counts, row_digests = split_rows(table, data, special_texts(special_tokens(tokenizer)))
    splits = []
    for indices in rows.values():
        part = table.take(pa.array(indices, pa.int64()))
        systems, questions = part["system"].to_pylist(), part["question"].to_pylist()
        prompt = [format_prompt(s, q, tokenizer) for s, q in zip(systems, questions, strict=True)]
        chosen, rejected = (
            [a + ANSWER_SUFFIX for a in part[name].to_pylist()] for name in ("chosen", "rejected")
        )
        splits.append(
            pa.table(
                {
                    "id": pa.array([row_id(row_digests[i]) for i in indices], pa.string()),
                    "system": part["system"],
                    "question": part["question"],
                    "prompt": pa.array(prompt, pa.string()),
                    "chosen": pa.array(chosen, pa.string()),
                    "rejected": pa.array(rejected, pa.string()),
                },
            )
        )
    train, test = splits
    return train, test, {"rows_in": rows_in, "dropped": counts}
