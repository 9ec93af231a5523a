"""prepare stage: raw preference rows -> ChatML-formatted train/test Parquet for DPO.

Reads: params `data.*` but the length limits (SECTIONS); the raw rows (`data.path`: .jsonl, .json or
.parquet; or, with `data.source: hub`, `data.hub_name` at the pinned `data.hub_revision` through
`datasets`); the tokenizer in models/base/ (its chat template). The stage does not read `seed` (dvc.yaml does not declare it):
the split is by content hash, rows keep their input order, and the trainer shuffles.
Writes: data/prepared/train.parquet, data/prepared/test.parquet (zstd, with schema metadata) and
metrics/data.json.

Steps:
1. Read and validate every row. Structural problems (missing column, null or non-string text, an
   unparseable JSON line, no rows, an unsupported file type) stop the stage with a message naming the
   file, the row and the column, before anything is written: previous outputs stay byte-identical.
2. Content filters drop rows and count each reason (first matching reason wins, in REASONS order).
3. ChatML formatting exactly as in Maxime Labonne's NeuralHermes-2.5 article (`format_row`), done for the
   rows of a split at once with pyarrow string joins (`format_table`) and checked against `format_row`.
4. A train/test split by a stable hash of each row's content: a row's split depends only on its own
   text, so adding rows never moves existing ones. The hash also gives the row id.

Token ids and the length limits (data.max_prompt_length, data.max_length) are the tokenize stage's
(stages/tokenize.py): this stage reads no token-related params, so changing a limit does not re-run it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from stages.common import (
    BASE_DIR,
    METRICS_DIR,
    PREPARED_DIR,
    StageError,
    atomic_dir,
    load_tokenizer,
    sha256_file,
    template_hash,
    write_json,
)

TEXT_COLUMNS = ("system", "question", "chosen", "rejected")
# Raw schemas: name -> the source columns that become (system, question, chosen, rejected).
SCHEMAS: dict[str, tuple[str, str, str, str]] = {
    "current": ("system", "question", "chosen", "rejected"),
    # The original Intel/orca_dpo_pairs columns: the ChatGPT answer is the preferred one.
    "original": ("system", "question", "chatgpt", "llama2-13b-chat"),
}
SUFFIXES = (".jsonl", ".json", ".parquet")
# Why rows are dropped, in the order they are tested (a row counts under its first reason).
REASONS = (
    "blank_question",  # question is empty or whitespace only
    "blank_answer",  # chosen or rejected is empty or whitespace only
    "identical_answers",  # chosen == rejected: no preference to learn
    "duplicate",  # same system/question/chosen/rejected as an earlier row (the first is kept)
)
# The article appends the end-of-turn marker to both answers by hand.
ANSWER_SUFFIX = "<|im_end|>\n"
OUTPUT_COLUMNS = ("id", "system", "question", "prompt", "chosen", "rejected")
# Exactly the params this stage declares in dvc.yaml (the length limits belong to the tokenize stage).
SECTIONS = [
    "data.source",
    "data.path",
    "data.hub_name",
    "data.hub_revision",
    "data.hub_split",
    "data.columns",
    "data.test_fraction",
]
CHECK_ROWS = 8  # rows on which the vectorised formatting is compared with format_row at run time


# ---------------------------------------------------------------------------------------------------------
# Formatting


def format_row(row: dict[str, str], tokenizer) -> dict[str, str]:
    """One row in ChatML, exactly as the article's `chatml_format`: the reference implementation."""
    # Format system
    if len(row["system"]) > 0:
        message = {"role": "system", "content": row["system"]}
        system = tokenizer.apply_chat_template([message], tokenize=False)
    else:
        system = ""

    # Format instruction
    message = {"role": "user", "content": row["question"]}
    prompt = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

    # Format chosen answer
    chosen = row["chosen"] + ANSWER_SUFFIX

    # Format rejected answer
    rejected = row["rejected"] + ANSWER_SUFFIX

    return {"prompt": system + prompt, "chosen": chosen, "rejected": rejected}


_SENTINEL = "\x00SENTINEL-{}\x00"
# Contents that a template which strips, escapes or otherwise edits the text would render differently.
_PROBES = ("plain", " leading and trailing space \n", "line\n\nbreaks {{ braces }} <b>&amp;</b>", "é 日本")


def template_pieces(tokenizer) -> dict[str, str]:
    """The constant text around a system turn and around a user turn (with the generation prompt).

    The template is rendered once with sentinel contents and split around them. Raises StageError when
    the template does not render as prefix + content + suffix for every content, since then the
    vectorised formatting would differ from `format_row`.
    """
    pieces: dict[str, str] = {}
    for role, kwargs in (("system", {}), ("user", {"add_generation_prompt": True})):

        def render(content: str, role: str = role, kwargs: dict = kwargs) -> str:
            try:
                return tokenizer.apply_chat_template(
                    [{"role": role, "content": content}], tokenize=False, **kwargs
                )
            except Exception as err:  # noqa: BLE001 - jinja errors of any kind mean "not this shape"
                raise StageError(
                    f"chat template: rendering a single {role} turn failed ({type(err).__name__}: {err}); "
                    "expected a ChatML template"
                ) from None

        sentinel = _SENTINEL.format(role)
        rendered = render(sentinel)
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            raise StageError(
                f"chat template: a single {role} turn does not render its content exactly once; "
                "expected a ChatML-style template (prefix + content + suffix)"
            )
        prefix, suffix = rendered.split(sentinel)
        for probe in _PROBES:
            got = render(probe)
            if got != prefix + probe + suffix:
                raise StageError(
                    f"chat template: the {role} turn is not rendered as a constant prefix + content + "
                    f"constant suffix (content {probe!r} rendered as {got!r}); expected a ChatML-style "
                    "template"
                )
        pieces[f"{role}_prefix"], pieces[f"{role}_suffix"] = prefix, suffix
    end_of_turn = ANSWER_SUFFIX.strip()
    token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if token_id is None or token_id == tokenizer.unk_token_id or end_of_turn not in pieces["user_suffix"]:
        raise StageError(
            f"chat template: answers are closed with {end_of_turn!r} as in the article, but the base "
            "tokenizer does not have it as a token ending the user turn; expected a ChatML template"
        )
    return pieces


def format_table(table, tokenizer):
    """(prompt, chosen, rejected) arrays for a table with TEXT_COLUMNS: `format_row` for every row at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pieces = template_pieces(tokenizer)
    system = table["system"]
    system_turn = pc.if_else(
        pc.greater(pc.utf8_length(system), 0),
        pc.binary_join_element_wise(pieces["system_prefix"], system, pieces["system_suffix"], ""),
        pa.scalar("", pa.string()),
    )
    prompt = pc.binary_join_element_wise(
        system_turn, pieces["user_prefix"], table["question"], pieces["user_suffix"], ""
    )
    chosen = pc.binary_join_element_wise(table["chosen"], ANSWER_SUFFIX, "")
    rejected = pc.binary_join_element_wise(table["rejected"], ANSWER_SUFFIX, "")
    return prompt, chosen, rejected


def check_formatting(table, formatted, tokenizer, rows: Iterable[int]) -> None:
    """Raise StageError unless the vectorised formatting equals `format_row` on the given rows."""
    prompt, chosen, rejected = formatted
    for i in rows:
        raw = {name: table[name][i].as_py() for name in TEXT_COLUMNS}
        expected = format_row(raw, tokenizer)
        got = {"prompt": prompt[i].as_py(), "chosen": chosen[i].as_py(), "rejected": rejected[i].as_py()}
        if got != expected:
            raise StageError(
                f"internal check failed: vectorised ChatML formatting of row {i} differs from format_row "
                f"(got {str(got)[:300]!r}, expected {str(expected)[:300]!r})"
            )


def check_rows(table) -> list[int]:
    """A few rows to compare: the first rows plus the first with and without a system prompt."""
    import pyarrow.compute as pc

    n = table.num_rows
    picks = set(range(min(CHECK_ROWS, n)))
    has_system = pc.greater(pc.utf8_length(table["system"]), 0)
    for wanted in (True, False):
        index = pc.index(has_system, wanted).as_py()
        if index >= 0:
            picks.add(index)
    return sorted(picks)


# ---------------------------------------------------------------------------------------------------------
# Hashing and split


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


# json.dumps(ensure_ascii=False) escapes exactly these: two-character forms, then \u00xx for other controls.
_SHORT_ESCAPES = (
    (b"\\", b"\\\\"),  # the backslash first, so the ones added below are not escaped again
    (b'"', b'\\"'),
    (b"\n", b"\\n"),
    (b"\r", b"\\r"),
    (b"\t", b"\\t"),
    (b"\b", b"\\b"),
    (b"\f", b"\\f"),
)
_CONTROL = re.compile(rb"[\x00-\x1f]")


@functools.cache
def _escape_growth():
    """Bytes that JSON-escaping adds to each byte value: 1 for the two-character escapes, 5 for \\u00xx."""
    import numpy as np

    growth = np.zeros(256, dtype=np.uint8)
    growth[:0x20] = 5
    for char, _escaped in _SHORT_ESCAPES:
        growth[char[0]] = 1
    return growth


def _json_escaped(array) -> tuple[bytes, Any]:
    """(UTF-8 bytes, offsets) of a string column with every value escaped as `json.dumps(ensure_ascii=False)`
    escapes a string: backslash, double quote and the control characters U+0000-U+001F, nothing else.

    UTF-8 encodes those characters as single bytes below 0x80, which never occur inside a multi-byte
    sequence, so the column's whole data buffer is escaped at once with bytes.replace; each value's new
    offset is its old one plus the bytes that the escapes before it added.
    """
    import numpy as np
    import pyarrow as pa

    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32  # string: int32 offsets, no copy
    _validity, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=width)[array.offset : array.offset + len(array) + 1]
    offsets = offsets.astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    raw = np.frombuffer(data_buffer, dtype=np.uint8)[start:end] if end > start else np.zeros(0, np.uint8)
    offsets = offsets - start
    growth = _escape_growth()[raw]
    where = np.flatnonzero(growth)
    data = raw.tobytes()
    if where.size == 0:
        return data, offsets
    growth = growth[where]
    added = np.concatenate(([0], np.cumsum(growth, dtype=np.int64)))
    offsets = offsets + added[np.searchsorted(where, offsets)]
    for char, escaped in _SHORT_ESCAPES:
        data = data.replace(char, escaped)
    if (growth == 5).any():
        data = _CONTROL.sub(lambda match: b"\\u%04x" % match.group()[0], data)
    return data, offsets


def digests(table) -> list[bytes]:
    """`row_digest` of every row, computed on the Arrow buffers (12,859 orca rows: 0.09 s instead of 0.21 s).

    Gives the same bytes as `row_digest` (tests/unit/test_prepare_format.py checks it on every escape)."""
    columns = [_json_escaped(table[name]) for name in TEXT_COLUMNS]
    bounds = [offsets.tolist() for _data, offsets in columns]
    views = [memoryview(data) for data, _offsets in columns]
    (s, so), (q, qo), (c, co), (r, ro) = zip(views, bounds, strict=True)
    sha256 = hashlib.sha256
    out = []
    for i in range(table.num_rows):
        j = i + 1
        out.append(
            sha256(
                b"".join(
                    (
                        b'["',
                        s[so[i] : so[j]],
                        b'", "',
                        q[qo[i] : qo[j]],
                        b'", "',
                        c[co[i] : co[j]],
                        b'", "',
                        r[ro[i] : ro[j]],
                        b'"]',
                    )
                )
            ).digest()
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading and validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def detect_schema(columns: Sequence[str], wanted: str, source: str) -> str:
    """'current' or 'original' for these column names; `wanted` is data.columns (auto|current|original)."""
    found = set(columns)
    listing = ", ".join(sorted(found)) or "none"
    if wanted != "auto":
        missing = [c for c in SCHEMAS[wanted] if c not in found]
        if missing:
            raise StageError(
                f"{source}: data.columns is {wanted!r} but column(s) {', '.join(missing)} are missing; "
                f"found columns: {listing}; expected: {', '.join(SCHEMAS[wanted])}"
            )
        return wanted
    matches = [name for name, cols in SCHEMAS.items() if found.issuperset(cols)]
    if len(matches) == 1:
        return matches[0]
    expected = " or ".join(f"({', '.join(cols)}) [{name}]" for name, cols in SCHEMAS.items())
    if not matches:
        raise StageError(f"{source}: unknown raw schema: found columns: {listing}; expected {expected}")
    raise StageError(
        f"{source}: columns of both raw schemas are present ({listing}); set data.columns to "
        "'current' or 'original' in params.yaml to say which pair of answers to use"
    )


def _parse_json_lines(text: str, source: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    # JSON Lines are separated by \n only: str.splitlines would also split inside strings holding U+2028,
    # U+0085 and the like, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no row
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(
                f"{source}: line {number}: not valid JSON ({err.msg}; column {err.colno})"
            ) from None
        if not isinstance(value, dict):
            raise StageError(f"{source}: line {number}: expected a JSON object, got {_type_name(value)}")
        rows.append(value)
        where.append(f"line {number}")
    return rows, where


def read_json_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a .jsonl file, or of a .json file holding a JSON array or JSON Lines.

    Returns the rows and, for each, where it is in the file ('line 12' or 'row index 3') for messages.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StageError(f"{source}: not UTF-8 text ({err})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise StageError(
                f"{source}: not valid JSON ({err.msg}; line {err.lineno}, column {err.colno})"
            ) from None
        rows, where = [], []
        for index, value in enumerate(data):
            if not isinstance(value, dict):
                raise StageError(
                    f"{source}: row index {index}: expected a JSON object, got {_type_name(value)}"
                )
            rows.append(value)
            where.append(f"row index {index}")
        return rows, where
    return _parse_json_lines(text, source)


def rows_to_table(rows: list[dict], where: list[str], wanted: str, source: str):
    """Validate JSON rows and return (table with TEXT_COLUMNS, detected schema)."""
    import pyarrow as pa

    if not rows:
        raise StageError(f"{source}: no rows (empty input); expected {' / '.join(SCHEMAS['current'])} rows")
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    schema = detect_schema(list(columns), wanted, source)
    source_columns = SCHEMAS[schema]
    values: list[list[str]] = [[] for _ in source_columns]
    for row, place in zip(rows, where, strict=True):
        for j, column in enumerate(source_columns):
            if column not in row:
                raise StageError(
                    f"{source}: {place}: column {column!r} is missing "
                    f"(this row has: {', '.join(row) or 'no columns'})"
                )
            value = row[column]
            if value is None:
                raise StageError(f"{source}: {place}: column {column!r} is null where text is required")
            if not isinstance(value, str):
                raise StageError(
                    f"{source}: {place}: column {column!r}: expected a string, "
                    f"got {_type_name(value)} {json.dumps(value)[:60]}"
                )
            values[j].append(value)
    table = pa.table(
        {name: pa.array(col, pa.string()) for name, col in zip(TEXT_COLUMNS, values, strict=True)}
    )
    return table, schema


def validate_arrow(table, wanted: str, source: str):
    """Validate an Arrow table (Parquet or hub rows) and return (table with TEXT_COLUMNS, schema)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        raise StageError(f"{source}: no rows (empty input)")
    schema = detect_schema(table.column_names, wanted, source)
    out = {}
    for name, column in zip(TEXT_COLUMNS, SCHEMAS[schema], strict=True):
        array = table[column]
        nulls = pc.is_null(array)
        if pc.any(nulls).as_py():
            index = pc.index(nulls, True).as_py()
            raise StageError(f"{source}: row index {index}: column {column!r} is null where text is required")
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            sample = array[0].as_py()
            raise StageError(
                f"{source}: row index 0: column {column!r}: expected a string, got {array.type} "
                f"{json.dumps(sample, default=str)[:60]}"
            )
        out[name] = array.cast(pa.string()).combine_chunks()
    return pa.table(out), schema


def read_local(path: Path, wanted: str):
    """(table with TEXT_COLUMNS, detected schema) from a local raw file."""
    import pyarrow.parquet as pq

    source = str(path)
    if path.suffix not in SUFFIXES:
        raise StageError(
            f"{source}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise StageError(f"{source}: raw data file not found (set data.path, or `dvc pull` / `dvc add` it)")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any reader error means the file is not usable Parquet
            raise StageError(f"{source}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        return validate_arrow(table, wanted, source)
    fast = read_json_lines_fast(path, wanted)
    if fast is not None:
        return fast
    rows, where = read_json_rows(path)
    return rows_to_table(rows, where, wanted, source)


def read_json_lines_fast(path: Path, wanted: str):
    """(table, schema) of a JSON Lines file read by pyarrow's C++ reader, or None to use the Python reader.

    pyarrow parses and validates in a fraction of the time of json.loads per line (0.15 s vs 0.6 s for the
    12,859 orca rows) but cannot say on which line a problem is. So any parse or validation failure here
    returns None and the file is read again line by line by `read_json_rows` + `rows_to_table`, which raise
    the error that names the line and column. A file both readers accept gives the same table (tested).
    """
    import pyarrow.json as pj

    if path.suffix == ".json":
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip()
        if head.startswith(b"["):
            return None  # a JSON array: the Python reader's job
    try:
        table = pj.read_json(path)
        return validate_arrow(table, wanted, str(path))
    except Exception:  # noqa: BLE001 - whatever went wrong, the line-by-line reader says it precisely
        return None


def read_hub(data) -> tuple[Any, str, str]:
    """(table, schema, label) from the hub dataset pinned in params; the only hub access for data."""
    label = f"{data.hub_name}@{data.hub_revision}"
    try:
        import datasets

        dataset = datasets.load_dataset(data.hub_name, revision=data.hub_revision, split=data.hub_split)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, bad revision: all mean "no data"
        raise StageError(
            f"dataset {data.hub_name} at revision {data.hub_revision} (split {data.hub_split}) could not be "
            f"loaded from the hub ({type(err).__name__}: {err}). Check the name and revision and the network "
            "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE must be unset), or download it once and use data.source: "
            "local with data.path"
        ) from None
    table = dataset.with_format("arrow")[:]
    validated, schema = validate_arrow(table, data.columns, f"{label} (split {data.hub_split})")
    return validated, schema, label


# ---------------------------------------------------------------------------------------------------------
# Filters


def content_masks(table, row_digests: list[bytes]) -> dict[str, Any]:
    """Boolean drop masks of the token-free filters, each True where that reason applies."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def blank(name: str):
        return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table[name])), 0)

    seen: set[bytes] = set()
    duplicate = []
    for digest in row_digests:
        duplicate.append(digest in seen)
        seen.add(digest)
    return {
        "blank_question": blank("question"),
        "blank_answer": pc.or_(blank("chosen"), blank("rejected")),
        "identical_answers": pc.equal(table["chosen"], table["rejected"]),
        "duplicate": pa.array(duplicate, pa.bool_()),
    }


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


# ---------------------------------------------------------------------------------------------------------
# The whole preparation, without side effects


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


def check_split(train, test, metrics: dict[str, Any], source: str, data) -> None:
    dropped = ", ".join(f"{r}={metrics[f'dropped_{r}']}" for r in REASONS)
    if metrics["rows_out"] == 0:
        raise StageError(f"{source}: no rows left after the content filters (dropped: {dropped})")
    for name, table in (("train", train), ("test", test)):
        if table.num_rows == 0:
            raise StageError(
                f"{source}: the {name} split is empty ({metrics['rows_out']} rows kept, "
                f"data.test_fraction={data.test_fraction}); add rows or change data.test_fraction"
            )


def parquet_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {f"dpo.{key}".encode(): str(value).encode() for key, value in meta.items()}


def write_prepared(out_dir: Path, train, test, meta: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    for name, table in (("train", train), ("test", test)):
        table = table.replace_schema_metadata(parquet_metadata({**meta, "split": name}))
        pq.write_table(table, out_dir / f"{name}.parquet", compression="zstd")


# ---------------------------------------------------------------------------------------------------------


def use_system_allocator() -> None:
    """Arrow buffers from the C library's malloc instead of pyarrow's default mimalloc pool: on 12,859
    orca-sized rows the stage's work (read, filters, formatting, split, write; a fresh process) took 0.47 s
    instead of 0.65 s here, the difference being mimalloc's first-touch cost on tens of MB of fresh text
    buffers. Process-wide, so run() (and bench.preparebench, which times run()'s work) call it first."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def run(
    params,
    raw_path: str | Path | None = None,
    base_dir: str | Path = BASE_DIR,
    prepared_dir: str | Path = PREPARED_DIR,
    metrics_path: str | Path = METRICS_DIR / "data.json",
) -> dict[str, Any]:
    """Prepare the data; returns the metrics written to `metrics_path`."""
    from stages import tracking

    use_system_allocator()
    data = params.data
    base_dir = Path(base_dir)
    if data.source == "local":
        raw = Path(raw_path if raw_path is not None else data.path)
        inputs = {"raw": raw, "base": base_dir}
        tags = {}
    else:
        raw = None
        inputs = {"base": base_dir}
        tags = {"input.raw.hub": f"{data.hub_name}@{data.hub_revision}:{data.hub_split}"}

    with tracking.stage_run("prepare", params, sections=SECTIONS, inputs=inputs, tags=tags):
        # Read and validate everything before writing anything.
        if raw is not None:
            table, schema = read_local(raw, data.columns)
            source, raw_hash = str(raw), sha256_file(raw)
        else:
            table, schema, label = read_hub(data)
            source, raw_hash = label, label
        if not base_dir.is_dir():
            raise StageError(
                f"{base_dir}: base model folder not found (run the base stage first: dvc repro base)"
            )
        tokenizer = load_tokenizer(base_dir)
        train, test, counts = prepare_table(table, tokenizer, data)
        metrics = data_metrics(train, test, counts)
        check_split(train, test, metrics, source, data)

        meta = {
            "raw_source": source,
            "raw_data_hash": raw_hash,
            "raw_schema": schema,
            "chat_template_hash": template_hash(tokenizer.chat_template),
            "rows_in": metrics["rows_in"],
            "rows_out": metrics["rows_out"],
            "rows_train": metrics["rows_train"],
            "rows_test": metrics["rows_test"],
            "test_fraction": data.test_fraction,
        }
        with atomic_dir(prepared_dir) as tmp:
            write_prepared(tmp, train, test, meta)
        write_json(metrics_path, metrics)

        tracking.log_metrics(metrics)
        tracking.set_tags({"data.raw_schema": schema, "data.raw_data_hash": raw_hash})
        tracking.log_outputs({"prepared": prepared_dir})
    return metrics


def main() -> None:
    from stages import common, config

    def _run() -> None:
        run(config.load())

    common.run_main(_run)


if __name__ == "__main__":
    main()
