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
    "blank_question",  # a prompt turn (the question or an earlier one) is empty or whitespace only
    "blank_answer",  # chosen or rejected is empty or whitespace only
    "identical_answers",  # chosen == rejected: no preference to learn
    # A text holds a special token of the base's tokenizer or one of its chat template's control strings
    # (<|im_end|>, </s>, [INST], ...): the tokenizer would make it the real control token, or the rendered text
    # would read as a new turn, so one raw row could forge extra turns or end the text.
    "special_token",
    "duplicate",  # same turns, chosen and rejected as an earlier row, from any source (the first is kept)
)


def row_digest(system: str, question: str, chosen: str, rejected: str, history: str = "[]") -> bytes:
    """sha256 of a row's content (after mapping to the internal columns): its identity everywhere.

    JSON-encoding the strings keeps the encoding unambiguous whatever characters they hold. A one-turn row (no
    `history`) hashes the four strings alone, so orca rows keep the ids they had before multi-turn rows existed;
    a multi-turn row hashes its earlier turns too (a five-element array: it cannot equal a four-element one).
    """
    if history == "[]":
        payload = json.dumps([system, question, chosen, rejected], ensure_ascii=False)
    else:
        payload = json.dumps([system, json.loads(history), question, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).digest()


def row_id(digest: bytes) -> str:
    return digest[:8].hex()


def is_test(digest: bytes, test_fraction: float) -> bool:
    """The split of a row depends only on its own content: first 8 bytes of the digest as a uniform [0, 1)."""
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def digests(table) -> list[bytes]:
    """`row_digest` of every row of a table with TEXT_COLUMNS (and `history`, when it has one)."""
    columns = [table[name].to_pylist() for name in TEXT_COLUMNS]
    if "history" in table.column_names:
        columns.append(table["history"].to_pylist())
    return [row_digest(*row) for row in zip(*columns, strict=True)]


def share(digest: bytes) -> float:
    """A second uniform [0, 1) number of a row's content (digest bytes 8-16, independent of the split's 0-8):
    which rows a source's fraction / max_rows keeps."""
    return int.from_bytes(digest[8:16], "big") / 2**64


def take_share(table, fraction: float, max_rows: int):
    """(the rows of a source its share keeps, rows left out): those whose `share` is below `fraction`, then at
    most `max_rows` (0 = no limit) of the lowest. By content, so adding rows to a source never swaps out the rows
    it already gave; input order kept."""
    import pyarrow as pa

    if fraction >= 1.0 and max_rows == 0:
        return table, 0
    shares = [share(d) for d in digests(table)]
    chosen = [i for i, u in enumerate(shares) if u < fraction]
    if max_rows and len(chosen) > max_rows:
        chosen = sorted(sorted(chosen, key=lambda i: shares[i])[:max_rows])
    return table.take(pa.array(chosen, pa.int64())), table.num_rows - len(chosen)


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
    blank_question = blank("question")
    if "history" in table.column_names:  # earlier turns: as blank or as forged as the last one
        earlier = [[c for _role, c in json.loads(h)] for h in table["history"].to_pylist()]
        blank_turn = [any(not c.strip() for c in turns) for turns in earlier]
        forged = [any(s in c for c in turns for s in specials) for turns in earlier]
        blank_question = pc.or_(blank_question, pa.array(blank_turn, pa.bool_()))
        special = pc.or_(special, pa.array(forged, pa.bool_()))
    return {
        "blank_question": blank_question,
        "blank_answer": pc.or_(blank("chosen"), blank("rejected")),
        "identical_answers": pc.equal(table["chosen"], table["rejected"]),
        "special_token": special,
        "duplicate": pa.array(duplicate, pa.bool_()),
    }


def special_texts(specials: Sequence[str], controls: Sequence[str] | None = None) -> tuple[str, ...]:
    """What no raw text may contain: the given special tokens of a tokenizer plus the chat template's control
    strings (chatml.template_controls); without a template at hand (the validate stage), ChatML's turn markers."""
    from dpo_pipeline.data.chatml import TURN_MARKERS

    controls = TURN_MARKERS if controls is None else controls
    return tuple(sorted({s for s in (*specials, *controls) if s}))


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
