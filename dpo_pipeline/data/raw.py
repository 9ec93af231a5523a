"""Raw rows: readers (jsonl / json / parquet / hub) into the internal table (layout.RAW_COLUMNS), every format
(formats.py) and every source of a mixture (data.sources), with the quality filters and each source's share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import TEXT_COLUMNS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataSource


def require_encodable(value: str, where: str, column: str) -> None:
    """StageError unless `value` has a UTF-8 form: a JSON escape of a lone surrogate (\\ud800) decodes to a
    str that has none, and would fail later, in the tokenizer, without a line number."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise StageError(
            f"{where}: column {column!r}: a lone surrogate escape "
            f"({json.dumps(value[err.start])}) at character {err.start} is not text"
        ) from None


def require_text(row: dict, column: str, where: str) -> str:
    """row[column] as text, or a StageError naming `where` (file and row), the column and what was wrong: missing,
    null, not a string, or no UTF-8 form. Every reader of a text cell goes through it (orca and the other
    formats), so a cell is refused with the same words whatever its file's format."""
    if column not in row:
        raise StageError(
            f"{where}: column {column!r} is missing (this row has: {', '.join(row) or 'no columns'})"
        )
    value = row[column]
    if value is None:
        raise StageError(f"{where}: column {column!r} is null where text is required")
    if not isinstance(value, str):
        raise StageError(
            f"{where}: column {column!r}: expected a string, got {_type_name(value)} "
            f"{json.dumps(value, default=str)[:60]}"
        )
    require_encodable(value, where, column)
    return value


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    """The builtin base's corpus rows as {system, question, chosen, rejected, history, source}: read by
    `read_local`, the raw data's own reader (any format), so a file is accepted or refused (and the line named)
    the same way in both roles."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: corpus file not found (base.builtin.corpus)")
    table, _format = read_local(path, "auto")
    return table.to_pylist()


# Raw schemas: name -> the source columns that become (system, question, chosen, rejected).
SCHEMAS: dict[str, tuple[str, str, str, str]] = {
    "current": ("system", "question", "chosen", "rejected"),
    # The original Intel/orca_dpo_pairs columns: the ChatGPT answer is the preferred one.
    "original": ("system", "question", "chatgpt", "llama2-13b-chat"),
}


SUFFIXES = (".jsonl", ".json", ".parquet")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return "dict" if isinstance(value, dict) else type(value).__name__  # _Object is a dict to the user


class _Object(dict):
    """A JSON object as json.loads builds it with `_pairs`; `repeated` is a key given twice in it (json.loads
    alone keeps the last value and pyarrow refuses the row: either way a silent choice, so it is refused)."""

    repeated: str | None = None


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        out.repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return out


def _loads(text: str, source: str, line: int | None = None) -> Any:
    """json.loads of one JSON Lines line (`line`) or a whole JSON array file, naming where in a StageError."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as err:
        if line is None:
            raise StageError(
                f"{source}: not valid JSON ({err.msg}; line {err.lineno}, column {err.colno})"
            ) from None
        if err.msg == "Extra data":
            raise StageError(
                f"{source}: line {line}: more than one JSON value on the line (the next begins at column "
                f"{err.colno}); JSON Lines holds one object per line"
            ) from None
        raise StageError(f"{source}: line {line}: not valid JSON ({err.msg}; column {err.colno})") from None


def _require_object(value: Any, source: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise StageError(f"{source}: {where}: expected a JSON object, got {_type_name(value)}")
    if getattr(value, "repeated", None) is not None:
        raise StageError(
            f"{source}: {where}: key {value.repeated!r} appears twice in the object; expected each key once"
        )
    return value


def _parse_json_lines(text: str, source: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    # JSON Lines are separated by \n only: str.splitlines would also split inside strings holding U+2028,
    # U+0085 and the like, which JSON allows unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no row
        rows.append(_require_object(_loads(line, source, number), source, f"line {number}"))
        where.append(f"line {number}")
    return rows, where


def read_json_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a .jsonl file, or of a .json file holding a JSON array or JSON Lines.

    Returns the rows and, for each, where it is in the file ('line 12' or 'row index 3') for messages.
    """
    source = str(path)
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not content
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise StageError(
            f"{source}: line {line}: not valid UTF-8 text (byte {column} of the line: "
            f"{data[max(err.start - 8, 0) : err.start + 8]!r}); the raw file must be UTF-8"
        ) from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        data = _loads(text, source)
        rows, where = [], []
        for index, value in enumerate(data):
            rows.append(_require_object(value, source, f"row index {index}"))
            where.append(f"row index {index}")
        return rows, where
    return _parse_json_lines(text, source)


def rows_to_table(rows: list[dict], where: list[str], schema: str, source: str):
    """Validate orca JSON rows (`schema`: a SCHEMAS name) and return the table with TEXT_COLUMNS."""
    import pyarrow as pa

    source_columns = SCHEMAS[schema]
    values: list[list[str]] = [[] for _ in source_columns]
    for row, place in zip(rows, where, strict=True):
        for j, column in enumerate(source_columns):
            values[j].append(require_text(row, column, f"{source}: {place}"))
    return pa.table(
        {name: pa.array(col, pa.string()) for name, col in zip(TEXT_COLUMNS, values, strict=True)}
    )


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_string_view(arrow_type)
    )


def validate_arrow(table, schema: str, source: str):
    """Validate orca rows of an Arrow table (Parquet or hub rows; `schema`: a SCHEMAS name) and return the table
    with TEXT_COLUMNS."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for name, column in zip(TEXT_COLUMNS, SCHEMAS[schema], strict=True):
        array = table[column]
        # Other Arrow encodings of text (pandas' `category` is dictionary-encoded; string_view) are text too.
        if pa.types.is_dictionary(array.type) and _is_text(array.type.value_type):
            array = array.cast(array.type.value_type)
        if pa.types.is_string_view(array.type):
            array = array.cast(pa.string())
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
        require_utf8(out[name], column, source)
    return pa.table(out)


def require_utf8(array, column: str, source: str) -> None:
    """StageError naming the first row whose text is not valid UTF-8. pyarrow's readers (JSON and Parquet)
    take any bytes into a string column; Arrow's full validation finds them, then the row is looked up."""
    import pyarrow as pa

    try:
        array.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for index, value in enumerate(array.cast(pa.binary()).to_pylist()):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise StageError(
                f"{source}: row index {index}: column {column!r}: not valid UTF-8 text "
                f"(byte {err.start}: {value[max(err.start - 8, 0) : err.start + 8]!r})"
            ) from None
    raise StageError(f"{source}: column {column!r}: not a valid Arrow string column")


def _load_local(path: Path):
    """('arrow', table) for Parquet, ('json', rows, where) for JSON Lines / JSON; StageError naming the file."""
    import pyarrow.parquet as pq

    source = str(path)
    if path.suffix not in SUFFIXES:
        raise StageError(
            f"{source}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(SUFFIXES)}"
        )
    if path.is_dir():
        raise StageError(f"{source}: is a folder; data.path must name one {' / '.join(SUFFIXES)} file")
    if not path.is_file():
        raise StageError(f"{source}: raw data file not found (set data.path, or `dvc pull` / `dvc add` it)")
    if path.suffix == ".parquet":
        try:
            return ("arrow", pq.read_table(path))
        except Exception as err:  # noqa: BLE001 - any reader error means the file is not usable Parquet
            detail = " ".join(str(err).split())  # pyarrow's thrift errors span lines: one line here
            raise StageError(
                f"{source}: not a readable Parquet file ({type(err).__name__}: {detail})"
            ) from None
    rows, where = read_json_rows(path)
    return ("json", rows, where)


def _load_hub(spec: DataSource):
    """The pinned hub dataset as an Arrow table: the only hub access for data."""
    try:
        import datasets

        dataset = datasets.load_dataset(spec.hub_name, revision=spec.hub_revision, split=spec.hub_split)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, bad revision: all mean "no data"
        raise StageError(
            f"dataset {spec.hub_name} at revision {spec.hub_revision} (split {spec.hub_split}) could not be "
            f"loaded from the hub ({type(err).__name__}: {err}). Check the name and revision and the network "
            "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE must be unset), or download it once and use data.source: "
            "local with data.path"
        ) from None
    return dataset.with_format("arrow")[:]


def _arrow_rows(table, fmt: str, filters, source: str) -> tuple[list[dict], list[str]]:
    """The rows of the columns a non-orca format reads, as Python values, after Arrow's UTF-8 check (pyarrow
    takes any bytes into a string column; to_pylist would fail on them without naming the row)."""
    import pyarrow as pa

    from dpo_pipeline.data.formats import OPTIONAL, REQUIRED

    wanted = [*REQUIRED[fmt], *OPTIONAL.get(fmt, ()), *filters.drop_flagged]
    table = table.select([c for c in dict.fromkeys(wanted) if c in table.column_names])
    try:
        table.validate(full=True)
    except pa.ArrowInvalid:
        for name in table.column_names:
            column = table[name].combine_chunks()
            if _is_text(column.type):
                require_utf8(column, name, source)
        raise StageError(f"{source}: a nested column holds text that is not valid UTF-8") from None
    return table.to_pylist(), [f"row index {i}" for i in range(table.num_rows)]


class SourceRead:
    """One source read into the internal table: `table` (layout.RAW_COLUMNS), the format it was read as, where it
    came from (`label`, `raw_hash`: the file's sha256 or the hub name@revision) and its counts."""

    def __init__(self, name: str, label: str, raw_hash: str, fmt: str, table, counts: dict[str, int]):
        self.name, self.label, self.raw_hash, self.format = name, label, raw_hash, fmt
        self.table, self.counts = table, counts


def to_internal(loaded, wanted: str, filters, source: str, name: str):
    """A loaded file or hub table -> (internal table, format, counts): the format detected (or checked), the
    filters checked against what the source can give them, the rows converted and filtered."""
    import pyarrow as pa

    from dpo_pipeline.data.formats import (
        CONVERSION_REASONS,
        ORCA_FORMATS,
        QUALITY_REASONS,
        arrow_kind,
        convert_rows,
        detect_format,
        filter_problem,
        rows_table,
        value_kind,
    )

    if loaded[0] == "arrow":
        table = loaded[1]
        if table.num_rows == 0:
            raise StageError(f"{source}: no rows (empty input)")
        columns = table.column_names
        kinds = {c: arrow_kind(table.schema.field(c).type) for c in ("prompt", "chosen") if c in columns}
    else:
        rows, where = loaded[1], loaded[2]
        if not rows:
            raise StageError(
                f"{source}: no rows (empty input); expected {' / '.join(SCHEMAS['current'])} rows"
            )
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
        kinds = {c: value_kind(rows[0].get(c)) for c in ("prompt", "chosen")}
    rows_in = table.num_rows if loaded[0] == "arrow" else len(rows)
    fmt = detect_format(columns, kinds, wanted, source)
    problem = filter_problem(filters, fmt, columns)
    if problem:
        raise StageError(f"{source}: {problem}")
    counts = {"rows_in": rows_in, **dict.fromkeys((*CONVERSION_REASONS, *QUALITY_REASONS, "swapped"), 0)}
    if fmt in ORCA_FORMATS:
        schema = ORCA_FORMATS[fmt]
        if loaded[0] == "arrow":
            text = validate_arrow(table, schema, source)
        else:
            text = rows_to_table(rows, where, schema, source)
        n = text.num_rows
        internal = text.append_column("history", pa.array(["[]"] * n, pa.string())).append_column(
            "source", pa.array([name] * n, pa.string())
        )
        return internal, fmt, counts
    if loaded[0] == "arrow":
        rows, where = _arrow_rows(table, fmt, filters, source)
    kept, counted = convert_rows(rows, where, fmt, source, filters)
    return rows_table(kept, name), fmt, {**counts, **counted}


def read_local(path: Path, wanted: str):
    """(internal table, format) of a local raw file read whole, no filters (the builtin corpus, benchmarks)."""
    from dpo_pipeline.data.formats import NO_FILTERS

    path = Path(path)
    table, fmt, _counts = to_internal(_load_local(path), wanted, NO_FILTERS, str(path), path.stem)
    return table, fmt


def read_source(spec: DataSource) -> SourceRead:
    """One source of data.sources (or the single source the data section names), converted and filtered (its
    fraction / max_rows share is taken later, by content hash: filters.take_share)."""
    from dpo_pipeline.io import sha256_file

    if spec.path:
        path = Path(spec.path)
        loaded = _load_local(path)
        label, raw_hash = str(path), sha256_file(path)
    else:
        loaded = ("arrow", _load_hub(spec))
        label = f"{spec.hub_name}@{spec.hub_revision} (split {spec.hub_split})"
        raw_hash = f"{spec.hub_name}@{spec.hub_revision}:{spec.hub_split}"
    table, fmt, counts = to_internal(loaded, spec.format, spec.filters, label, spec.name)
    return SourceRead(spec.name, label, raw_hash, fmt, table, counts)
