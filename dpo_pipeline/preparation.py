"""raw table -> the prepared splits: the prepare stage's filters, ChatML formatting and split, in that order."""

from __future__ import annotations

from typing import Any

from dpo_pipeline.chatml import check_formatting, check_rows, format_table
from dpo_pipeline.filters import REASONS, content_masks, digests, first_reason, is_test, row_id


def prepare_table(table, tokenizer, data) -> tuple[Any, Any, dict[str, Any]]:
    """Raw table (TEXT_COLUMNS) -> (train table, test table, counts) following `data` params.

    Each split's rows are taken from the raw table once, in input order, and formatted there: one copy of
    the text per split, not a filtered copy and then a split copy.
    """
    import pyarrow as pa

    rows_in = table.num_rows
    row_digests = digests(table)
    keep, counts = first_reason(content_masks(table, row_digests), rows_in, REASONS)
    rows: dict[str, list[int]] = {"train": [], "test": []}
    for i, (digest, kept) in enumerate(zip(row_digests, keep.to_pylist(), strict=True)):
        if kept:
            rows["test" if is_test(digest, data.test_fraction) else "train"].append(i)
    splits = []
    for indices in rows.values():
        part = table.take(pa.array(indices, pa.int64()))
        formatted = format_table(part, tokenizer)
        check_formatting(part, formatted, tokenizer, check_rows(part))
        prompt, chosen, rejected = formatted
        splits.append(
            pa.table(
                {
                    "id": pa.array([row_id(row_digests[i]) for i in indices], pa.string()),
                    "system": part["system"],
                    "question": part["question"],
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                },
            )
        )
    train, test = splits
    return train, test, {"rows_in": rows_in, "dropped": counts}
