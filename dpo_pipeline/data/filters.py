"""The prepare stage's counted drops, row ids, the content-hash split and the data metrics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import TEXT_COLUMNS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams

# Why rows are dropped, in the order they are tested (a row counts under its first reason).
REASONS = (
    "blank_question",  # question is empty or whitespace only
    "blank_answer",  # chosen or rejected is empty or whitespace only
    "identical_answers",  # chosen == rejected: no preference to learn
    # A text holds a special token of the base's tokenizer or a ChatML turn marker (<|im_end|>, </s>, ...): the
    # tokenizer would make it the real control token, so one raw row could forge extra turns or end the text.
    "special_token",
    "duplicate",  # same system/question/chosen/rejected as an earlier row (the first is kept)
)


def row_digest(system: str, question: str, chosen: str, rejected: str) -> bytes:
    """sha256 of a row's content (after mapping to current column names): its identity everywhere.

    JSON-encoding the four strings keeps the encoding unambiguous whatever characters they hold.
    """
    payload = json.dumps([system, question, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).digest()


def row_id(digest: bytes) -> str:
    return digest[:8].hex()


def is_test(digest: bytes, test_fraction: float) -> bool:
    """The split of a row depends only on its own content: first 8 bytes of the digest as a uniform [0, 1)."""
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def digests(table) -> list[bytes]:
    """`row_digest` of every row of a table with TEXT_COLUMNS."""
    columns = [table[name].to_pylist() for name in TEXT_COLUMNS]
    return [row_digest(*row) for row in zip(*columns, strict=True)]


def content_masks(table, row_digests: list[bytes], specials: Sequence[str]) -> dict[str, Any]:
    """Boolean drop masks of the token-free filters, each True where that reason applies. `specials`: the
    texts no field may hold (`special_texts`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def blank(name: str):
        return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table[name])), 0)

    seen: set[bytes] = set()
    duplicate = []
    for digest in row_digests:
        duplicate.append(digest in seen)
        seen.add(digest)
    special = pa.array([False] * table.num_rows, pa.bool_())
    for name in TEXT_COLUMNS:
        for text in specials:
            special = pc.or_(special, pc.match_substring(table[name], text))
    return {
        "blank_question": blank("question"),
        "blank_answer": pc.or_(blank("chosen"), blank("rejected")),
        "identical_answers": pc.equal(table["chosen"], table["rejected"]),
        "special_token": special,
        "duplicate": pa.array(duplicate, pa.bool_()),
    }


def special_texts(specials: Sequence[str]) -> tuple[str, ...]:
    """What no raw text may contain: the given special tokens of a tokenizer plus ChatML's turn markers (the
    prompt format's own, whether or not the tokenizer has them as special tokens)."""
    from dpo_pipeline.data.chatml import TURN_MARKERS

    return tuple(sorted({s for s in (*specials, *TURN_MARKERS) if s}))


def first_special(values: Sequence[str], specials: Sequence[str]) -> str | None:
    """The first of `specials` found in any of `values` (for messages and the builtin corpus)."""
    return next((s for s in specials for v in values if s in v), None)


def first_reason(masks: dict[str, Any], n: int, reasons: Sequence[str]):
    """Per row: the first of `reasons` whose mask is True (or None) -> (keep mask, counts per reason).

    Shared by prepare's content filters (REASONS) and the tokenize stage's length limits."""
    import pyarrow as pa
    import pyarrow.compute as pc

    remaining = pa.array([True] * n, pa.bool_())
    counts = {}
    for reason in reasons:
        hit = pc.and_(remaining, masks[reason])
        counts[reason] = pc.sum(hit).as_py() or 0
        remaining = pc.and_(remaining, pc.invert(masks[reason]))
    return remaining, counts


def data_metrics(train, test, counts: dict[str, Any]) -> dict[str, Any]:
    """Flat metrics for metrics/data.json (readable in `dvc metrics diff`)."""
    metrics: dict[str, Any] = {
        "rows_in": counts["rows_in"],
        "rows_out": train.num_rows + test.num_rows,
        "rows_train": train.num_rows,
        "rows_test": test.num_rows,
    }
    for reason in REASONS:
        metrics[f"dropped_{reason}"] = counts["dropped"].get(reason, 0)
    return metrics


def check_split(train, test, metrics: dict[str, Any], source: str, data: DataParams) -> None:
    dropped = ", ".join(f"{r}={metrics[f'dropped_{r}']}" for r in REASONS)
    if metrics["rows_out"] == 0:
        raise StageError(f"{source}: no rows left after the content filters (dropped: {dropped})")
    for name, table in (("train", train), ("test", test)):
        if table.num_rows == 0:
            raise StageError(
                f"{source}: the {name} split is empty ({metrics['rows_out']} rows kept, "
                f"data.test_fraction={data.test_fraction}); add rows or change data.test_fraction"
            )
