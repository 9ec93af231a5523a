"""Raw rows: readers (jsonl / json / parquet / hub) and schema detection (current and original columns)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import TEXT_COLUMNS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams


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


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    """The builtin base's corpus rows as {system, question, chosen, rejected}: read by `read_local`, the raw
    data's own reader, so a file is accepted or refused (and the line named) the same way in both roles."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: corpus file not found (base.builtin.corpus)")
    table, _schema = read_local(path, "auto")
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
            require_encodable(value, f"{source}: {place}", column)
            values[j].append(value)
    table = pa.table(
        {name: pa.array(col, pa.string()) for name, col in zip(TEXT_COLUMNS, values, strict=True)}
    )
    return table, schema


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_string_view(arrow_type)
    )


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
    return pa.table(out), schema


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


def read_local(path: Path, wanted: str):
    """(table with TEXT_COLUMNS, detected schema) from a local raw file."""
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
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - any reader error means the file is not usable Parquet
            detail = " ".join(str(err).split())  # pyarrow's thrift errors span lines: one line here
            raise StageError(
                f"{source}: not a readable Parquet file ({type(err).__name__}: {detail})"
            ) from None
        return validate_arrow(table, wanted, source)
    rows, where = read_json_rows(path)
    return rows_to_table(rows, where, wanted, source)


def read_hub(data: DataParams) -> tuple[Any, str, str]:
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
