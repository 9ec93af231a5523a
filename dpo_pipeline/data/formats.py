"""Raw preference rows in the shapes the field uses -> one internal row shape; the quality filters on scores.

Formats (`data.format`; `auto` detects them from the columns and their value types, `detect_format`):

  orca            system, question, chosen, rejected (strings): Intel/orca_dpo_pairs as the article reads it
  orca_original   system, question, chatgpt, llama2-13b-chat: orca's original columns (the ChatGPT answer preferred)
  argilla_orca    system, input, chosen, rejected, with status, chosen_score, rating and flags such as
                  in_gsm8k_train: argilla/distilabel-intel-orca-dpo-pairs (orca re-rated by GPT-4)
  standard        prompt, chosen, rejected strings (optional system): trl's standard format; the prompt is the
                  user's message as text, not a pre-templated string
  conversational  chosen, rejected as lists of {role, content} messages (trl's conversational format), with an
                  explicit `prompt` message list or an implicit one (folded into both answers); any number of turns
  ultrafeedback   prompt (string), chosen, rejected (message lists that include the user turn), score_chosen,
                  score_rejected: HuggingFaceH4/ultrafeedback_binarized
  hh_rlhf         chosen, rejected transcripts of "\\n\\nHuman: " / "\\n\\nAssistant: " turns: Anthropic/hh-rlhf

The internal row (`Row`) every later step reads: `system` (the first system message, "" = no system turn, as the
article's rule), `history` (every prompt turn between the system turn and the last user turn, in order), `question`
(the last user turn: the prompt ends there), `chosen` and `rejected` (one assistant answer each, plain text), and the
optional scores, status and boolean flags the quality filters read.

An implicit prompt is the longest common message prefix of the two conversations (trl's hh-rlhf converter takes the
common prefix up to the last "Assistant:" turn, the same split on parsed turns). Rows where the split leaves no
prompt ending in a user turn (`no_prompt`) or not exactly one assistant message per answer (`not_one_answer`) are
dropped and counted, never an error: they are shapes a public dataset holds by the dozen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.raw import require_encodable, require_text
from dpo_pipeline.errors import StageError

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataFilters

FORMATS = (
    "orca",
    "orca_original",
    "argilla_orca",
    "standard",
    "conversational",
    "ultrafeedback",
    "hh_rlhf",
)
# The columns each format needs (more columns are ignored, unless a filter names them).
REQUIRED: dict[str, tuple[str, ...]] = {
    "orca": ("system", "question", "chosen", "rejected"),
    "orca_original": ("system", "question", "chatgpt", "llama2-13b-chat"),
    "argilla_orca": ("system", "input", "chosen", "rejected"),
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("chosen", "rejected"),
    "ultrafeedback": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}
# Columns a format reads when they are there: scores, status, an optional system turn or explicit prompt.
OPTIONAL: dict[str, tuple[str, ...]] = {
    "argilla_orca": ("status", "chosen_score", "rating"),
    "standard": ("system", "score_chosen", "score_rejected"),
    "conversational": ("prompt", "score_chosen", "score_rejected"),
}
# Formats whose rows can carry scores for the quality filters.
SCORED = ("argilla_orca", "standard", "conversational", "ultrafeedback")
# No quality filter (the builtin corpus and the benchmarks read files whole).
NO_FILTERS = SimpleNamespace(
    drop_ties=False, min_chosen_score=None, min_score_margin=None, drop_flagged=[], swap_disagreeing=False
)
# The orca formats are read column-wise by raw.validate_arrow / rows_to_table (their errors and bytes predate the
# other formats); every other format goes through `convert`, one row at a time.
ORCA_FORMATS = {"orca": "current", "orca_original": "original"}

# Rows the conversion drops, counted (see the module docstring).
CONVERSION_REASONS = ("no_prompt", "not_one_answer")
# Rows the quality filters drop (data.filters), counted in this order: a row counts under its first reason.
QUALITY_REASONS = ("flagged", "tie", "unscored", "low_chosen_score", "low_margin")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Row:
    system: str
    history: list[dict[str, str]]
    question: str
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    status: str | None = None
    flags: dict[str, bool] = field(default_factory=dict)


def arrow_kind(arrow_type) -> str:
    """value_kind of an Arrow column's values, from its type alone (no row is decoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_string_view(arrow_type)
    ):
        return "str"
    if (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_list_view(arrow_type)
    ):
        return "list"
    if pa.types.is_null(arrow_type):
        return "null"
    return str(arrow_type)


def value_kind(value: Any) -> str:
    """'str', 'list', 'number', 'bool', 'null' or 'dict': what detection looks at."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    return "dict" if isinstance(value, dict) else type(value).__name__


def detect_format(columns: Sequence[str], kinds: dict[str, str], wanted: str, source: str) -> str:
    """The format of rows with these `columns` (`kinds`: value_kind of the prompt and chosen columns, from the
    first row or the Arrow types); `wanted` is data.format. A named format is checked for its columns; `auto`
    picks by the rules in the module docstring."""
    found = set(columns)
    listing = ", ".join(sorted(found)) or "none"
    if wanted != "auto":
        missing = [c for c in REQUIRED[wanted] if c not in found]
        if missing:
            raise StageError(
                f"{source}: data.format is {wanted!r} but column(s) {', '.join(missing)} are missing; "
                f"found columns: {listing}; expected: {', '.join(REQUIRED[wanted])}"
            )
        return wanted
    if {"system", "question"} <= found:
        current = {"chosen", "rejected"} <= found
        original = {"chatgpt", "llama2-13b-chat"} <= found
        if current and original:
            raise StageError(
                f"{source}: columns of both orca schemas are present ({listing}); set data.format to "
                "'orca' or 'orca_original' in params.yaml to say which pair of answers to use"
            )
        if current or original:
            return "orca" if current else "orca_original"
    if {"input", "chosen", "rejected", "status", "chosen_score"} <= found:
        return "argilla_orca"
    if {"chosen", "rejected"} <= found:
        kind = kinds.get("chosen")
        prompt = kinds.get("prompt", "null") if "prompt" in found else None
        if kind == "list":
            if prompt == "str" and {"score_chosen", "score_rejected"} <= found:
                return "ultrafeedback"
            return "conversational"
        if kind == "str":
            if prompt == "str":
                return "standard"
            if prompt is None:
                return "hh_rlhf"
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in REQUIRED.items())
    raise StageError(
        f"{source}: unknown raw schema: found columns: {listing}; expected one of the formats ({expected}), "
        "or set data.format"
    )


# ---------------------------------------------------------------------------------------------------------
# One row at a time


def _messages(row: dict, column: str, where: str) -> list[dict[str, str]]:
    """A column holding a list of {role, content} messages, checked; any other key in a message is refused
    (tool calls and names are not carried: saying so beats dropping them)."""
    if column not in row:
        raise StageError(
            f"{where}: column {column!r} is missing (this row has: {', '.join(row) or 'no columns'})"
        )
    value = row[column]
    if not isinstance(value, (list, tuple)):
        raise StageError(
            f"{where}: column {column!r}: expected a list of {{role, content}} messages, got "
            f"{value_kind(value)} {json.dumps(value, default=str)[:60]}"
        )
    out = []
    for index, message in enumerate(value):
        place = f"column {column!r}: message {index}"
        if not isinstance(message, dict):
            raise StageError(
                f"{where}: {place}: expected an object with role and content, got {value_kind(message)}"
            )
        extra = [k for k in message if k not in ("role", "content")]
        if extra:
            raise StageError(
                f"{where}: {place}: key {extra[0]!r} is not supported (a message carries role and content only)"
            )
        for key in ("role", "content"):
            text = message.get(key)
            if not isinstance(text, str):
                raise StageError(f"{where}: {place}: {key} must be a string, got {value_kind(text)}")
            require_encodable(text, where, f"{column}[{index}].{key}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _score(row: dict, column: str, where: str) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StageError(
            f"{where}: column {column!r}: expected a number or null, got {value_kind(value)} {value!r}"
        )
    return float(value)


def parse_hh(text: str, where: str, column: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript as messages: it must open with "\\n\\nHuman:"; each turn's text is kept verbatim
    (no stripping, as trl's converter keeps it)."""
    parts = _HH_TURN.split(text)
    if parts[0] != "" or len(parts) < 3:
        raise StageError(
            f"{where}: column {column!r}: expected an hh-rlhf transcript beginning with '\\n\\nHuman: ', got "
            f"{json.dumps(text[:40])}"
        )
    return [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def split_conversations(
    prompt: list[dict[str, str]] | None, chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], str, str] | str:
    """(prompt messages, chosen answer, rejected answer), or the reason the row is dropped. With an explicit
    `prompt`, answers that repeat it are cut after it; without one, the prompt is the longest common prefix."""
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
    else:
        for answer in (chosen, rejected):
            if answer[: len(prompt)] != prompt:
                break
        else:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        n = None
    if n is not None:
        chosen, rejected = chosen[n:], rejected[n:]
    if any(len(a) != 1 or a[0]["role"] != "assistant" for a in (chosen, rejected)):
        return "not_one_answer"
    if not prompt or prompt[-1]["role"] != "user":
        return "no_prompt"
    return prompt, chosen[0]["content"], rejected[0]["content"]


def from_messages(prompt: list[dict[str, str]], chosen: str, rejected: str) -> Row:
    """A Row from prompt messages ending in a user turn. The first message, when it is a system message, is the
    system turn; an empty one is none (the article's rule: a system turn only for non-empty text)."""
    system = ""
    if prompt[0]["role"] == "system":
        system, prompt = prompt[0]["content"], prompt[1:]
    return Row(
        system=system, history=prompt[:-1], question=prompt[-1]["content"], chosen=chosen, rejected=rejected
    )


def _argilla_rejected_score(row: dict, chosen_score: float | None) -> float | None:
    """argilla's rejected score: `rating` holds the two generations' ratings and `chosen_score` one of them, so the
    rejected answer's is the other (equal ratings: a tie). None when there is no rating (a few dozen rows)."""
    rating = row.get("rating")
    if chosen_score is None or not isinstance(rating, (list, tuple)) or len(rating) != 2:
        return None
    if any(r is None or isinstance(r, bool) or not isinstance(r, (int, float)) for r in rating):
        return None
    first, second = (float(r) for r in rating)
    if first == chosen_score:
        return second
    return first if second == chosen_score else None


def convert_row(row: dict, fmt: str, where: str, flags: Sequence[str]) -> Row | str:
    """One raw row of format `fmt` -> a Row, or the CONVERSION_REASONS entry it is dropped for."""
    if fmt == "argilla_orca":
        chosen_score = _score(row, "chosen_score", where)
        out = from_messages(
            _prompt_turns(require_text(row, "system", where), require_text(row, "input", where)),
            require_text(row, "chosen", where),
            require_text(row, "rejected", where),
        )
        out.score_chosen, out.score_rejected = chosen_score, _argilla_rejected_score(row, chosen_score)
        status = row.get("status")
        if status is not None and not isinstance(status, str):
            raise StageError(f"{where}: column 'status': expected a string or null, got {value_kind(status)}")
        out.status = status
    elif fmt == "standard":
        system = require_text(row, "system", where) if row.get("system") is not None else ""
        out = from_messages(
            _prompt_turns(system, require_text(row, "prompt", where)),
            require_text(row, "chosen", where),
            require_text(row, "rejected", where),
        )
    elif fmt == "hh_rlhf":
        split = split_conversations(
            None,
            parse_hh(require_text(row, "chosen", where), where, "chosen"),
            parse_hh(require_text(row, "rejected", where), where, "rejected"),
        )
        if isinstance(split, str):
            return split
        out = from_messages(*split)
    else:  # conversational, ultrafeedback
        explicit = None
        if fmt == "conversational" and row.get("prompt") is not None:
            explicit = _messages(row, "prompt", where)
        elif fmt == "ultrafeedback":
            require_text(
                row, "prompt", where
            )  # checked for its type; the turns themselves are in chosen / rejected
        split = split_conversations(
            explicit, _messages(row, "chosen", where), _messages(row, "rejected", where)
        )
        if isinstance(split, str):
            return split
        out = from_messages(*split)
    if fmt in ("standard", "conversational", "ultrafeedback"):
        out.score_chosen = _score(row, "score_chosen", where)
        out.score_rejected = _score(row, "score_rejected", where)
    for name in flags:
        value = row.get(name)
        if value is not None and not isinstance(value, bool):
            raise StageError(
                f"{where}: column {name!r} (data.filters.drop_flagged): expected true, false or null, got {value!r}"
            )
        out.flags[name] = bool(value)
    return out


def _prompt_turns(system: str, question: str) -> list[dict[str, str]]:
    from dpo_pipeline.data.chatml import conversation

    return conversation(system, question)


# ---------------------------------------------------------------------------------------------------------
# Quality filters (data.filters)


def filter_problem(filters: DataFilters, fmt: str, columns: Sequence[str]) -> str | None:
    """Why these filters cannot engage on a source of format `fmt` with `columns` (a filter that would do
    nothing is refused, not skipped), or None."""
    names = ("chosen_score", "rating") if fmt == "argilla_orca" else ("score_chosen", "score_rejected")
    scored = fmt in SCORED and names[0] in columns
    both = scored and names[1] in columns
    active = (
        filters.drop_ties
        or filters.min_chosen_score is not None
        or filters.min_score_margin is not None
        or filters.swap_disagreeing
        or filters.drop_flagged
    )
    if fmt in ORCA_FORMATS and active:
        return (
            f"data.filters: format {fmt} is read as the four orca text columns, with no scores or flags; the "
            "filters would do nothing (argilla's re-rated orca pairs are format argilla_orca)"
        )
    needs = []
    if filters.min_chosen_score is not None and not scored:
        needs.append("min_chosen_score needs a chosen score")
    if filters.min_score_margin is not None and not both:
        needs.append("min_score_margin needs both scores")
    if filters.swap_disagreeing and not both:
        needs.append("swap_disagreeing needs both scores")
    if filters.drop_ties and not (both or "status" in columns):
        needs.append("drop_ties needs both scores or a status column")
    for name in filters.drop_flagged:
        if name not in columns:
            needs.append(f"drop_flagged names column {name!r}, which it lacks")
    if not needs:
        return None
    return (
        f"data.filters: {needs[0]}; this source (format {fmt}, columns {', '.join(sorted(columns))}) cannot give "
        "it, so the filter would do nothing (score columns: score_chosen/score_rejected, or argilla's "
        "chosen_score and rating)"
    )


def quality_masks(rows: Sequence[Row], filters: DataFilters) -> tuple[dict[str, list[bool]], int]:
    """Swap chosen/rejected where the scores disagree (data.filters.swap_disagreeing; in place) and return the
    drop mask of each QUALITY_REASONS entry with the number swapped."""
    swapped = 0
    masks: dict[str, list[bool]] = {reason: [] for reason in QUALITY_REASONS}
    for row in rows:
        sc, sr = row.score_chosen, row.score_rejected
        if filters.swap_disagreeing and sc is not None and sr is not None and sr > sc:
            row.chosen, row.rejected = row.rejected, row.chosen
            row.score_chosen, row.score_rejected = sr, sc
            sc, sr = sr, sc
            swapped += 1
        masks["flagged"].append(any(row.flags.get(name, False) for name in filters.drop_flagged))
        masks["tie"].append(
            filters.drop_ties and (row.status == "tie" or (sc is not None and sr is not None and sc == sr))
        )
        needs_chosen = filters.min_chosen_score is not None or filters.min_score_margin is not None
        masks["unscored"].append(
            (needs_chosen and sc is None) or (filters.min_score_margin is not None and sr is None)
        )
        masks["low_chosen_score"].append(
            filters.min_chosen_score is not None and sc is not None and sc < filters.min_chosen_score
        )
        masks["low_margin"].append(
            filters.min_score_margin is not None
            and sc is not None
            and sr is not None
            and sc - sr < filters.min_score_margin
        )
    return masks, swapped


def first_reasons(
    masks: dict[str, list[bool]], reasons: Sequence[str], n: int
) -> tuple[list[bool], dict[str, int]]:
    """Per row: keep unless one of `reasons` applies; each dropped row counted under its first reason."""
    keep, counts = [], dict.fromkeys(reasons, 0)
    for i in range(n):
        reason = next((r for r in reasons if masks[r][i]), None)
        keep.append(reason is None)
        if reason is not None:
            counts[reason] += 1
    return keep, counts


def convert_rows(
    rows: Sequence[dict], where: Sequence[str], fmt: str, source: str, filters: DataFilters
) -> tuple[list[Row], dict[str, int]]:
    """Raw rows of format `fmt` -> (the Rows the conversion and the quality filters keep, counts per reason and
    `swapped`). Structural problems raise StageError naming `source`, the row and the column."""
    kept: list[Row] = []
    counts = dict.fromkeys(CONVERSION_REASONS, 0)
    for row, place in zip(rows, where, strict=True):
        out = convert_row(row, fmt, f"{source}: {place}", filters.drop_flagged)
        if isinstance(out, str):
            counts[out] += 1
        else:
            kept.append(out)
    masks, swapped = quality_masks(kept, filters)
    keep, quality = first_reasons(masks, QUALITY_REASONS, len(kept))
    return [r for r, k in zip(kept, keep, strict=True) if k], {**counts, **quality, "swapped": swapped}


def rows_table(rows: Sequence[Row], source_name: str):
    """Rows -> the internal Arrow table (layout.RAW_COLUMNS): the text columns, `history` as JSON, `source`."""
    import pyarrow as pa

    from dpo_pipeline.layout import RAW_COLUMNS

    columns: list[Callable[[Row], str]] = [
        lambda r: r.system,
        lambda r: r.question,
        lambda r: r.chosen,
        lambda r: r.rejected,
        lambda r: history_json(r.history),
        lambda r: source_name,
    ]
    return pa.table(
        {
            name: pa.array([get(r) for r in rows], pa.string())
            for name, get in zip(RAW_COLUMNS, columns, strict=True)
        }
    )


def history_json(history: Sequence[dict[str, str]]) -> str:
    """The one encoding of a row's earlier turns: what digests and the control-string check read."""
    return json.dumps([[m["role"], m["content"]] for m in history], ensure_ascii=False)


def history_messages(text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in json.loads(text)]
