"""Readers of the data stages' outputs (prepared, tokenized, the decontaminate stage's drop list), checked
against the contract in layout. Every later stage reads through these, so they import nothing but the contract."""

from __future__ import annotations

from pathlib import Path

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import DROP_FILE, PREPARED_COLUMNS, TOKENIZED_COLUMNS


def _read_split(path: Path, columns: tuple[str, ...], missing_hint: str, only: bool = False):
    """A split's Parquet file, checked to hold `columns` (and read to those alone when `only`); a missing file
    names the stage to run."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise StageError(f"{path}: {missing_hint}")
    if only:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise StageError(
                f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)})"
            )
        return pq.read_table(path, columns=list(columns))
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)})")
    return table


def read_prepared(prepared_dir: str | Path, split: str):
    """data/prepared/<split>.parquet as a pyarrow Table of the columns this stage reads."""
    path = Path(prepared_dir) / f"{split}.parquet"
    hint = "prepared split not found (run the prepare stage first: dvc repro prepare)"
    return _read_split(path, PREPARED_COLUMNS, hint).select(list(PREPARED_COLUMNS))


def read_drop_ids(contamination_dir: str | Path) -> frozenset[str]:
    """The training row ids the decontaminate stage selected for dropping."""
    path = Path(contamination_dir) / DROP_FILE
    hint = "decontamination result not found (run the decontaminate stage first: dvc repro decontaminate)"
    return frozenset(_read_split(path, ("id",), hint).column("id").to_pylist())


def read_tokenized(tokenized_dir: str | Path, split: str, columns: tuple[str, ...] | None = None):
    """data/tokenized/<split>.parquet as a pyarrow Table, checked for what training needs: the columns, at
    least one row, one row per id. `columns`: read only those (the pairs stage needs id and length, not the
    token ids)."""
    path = Path(tokenized_dir) / f"{split}.parquet"
    hint = "tokenized split not found (run the tokenize stage first: dvc repro tokenize)"
    table = _read_split(path, columns or TOKENIZED_COLUMNS, hint, only=columns is not None)
    if table.num_rows == 0:
        raise StageError(f"{path}: no rows")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise StageError(f"{path}: column id has duplicate values (expected one row per id)")
    return table


def strip_turn_newline(text: str, eos: str) -> str:
    """Answers end with eos + "\\n" (the ChatML turn separator); trl appends eos to any answer that does not
    end with eos, so the separator is dropped rather than getting a second eos after it."""
    return text[:-1] if text.endswith(eos + "\n") else text


def trl_texts(table, eos: str):
    """Prepared rows -> pyarrow Table(id, prompt, chosen, rejected): the strings handed to trl."""
    import pyarrow as pa

    def strip(name: str):
        return pa.array([strip_turn_newline(s, eos) for s in table.column(name).to_pylist()], pa.string())

    return pa.table(
        {
            "id": table.column("id"),
            "prompt": table.column("prompt"),
            "chosen": strip("chosen"),
            "rejected": strip("rejected"),
        }
    )
