"""Issue 15, point 1: text that is not valid UTF-8 never passes a reader. Both JSON Lines readers (pyarrow's
fast one and the line-by-line one) refuse the same files, the error names the line (or the Parquet row) and
column, and a file both accept gives the same table."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline.data import raw
from dpo_pipeline.errors import StageError


def line_by_line(path):
    """The JSON rows read by read_json_rows, then converted as read_local converts them: (table, format)."""
    from dpo_pipeline.data.formats import NO_FILTERS

    table, fmt, _counts = raw.to_internal(
        ("json", *raw.read_json_rows(path)), "auto", NO_FILTERS, str(path), path.stem
    )
    return table, fmt


ROW = {"system": "", "question": "What is 2+2?", "chosen": "4", "rejected": "5"}


def jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps(ROW).encode()
BAD_FILES = {
    "invalid-bytes": (
        [GOOD, GOOD.replace(b"2+2", b"2\xff2")],
        r"line 2: not valid UTF-8 text \(byte 38 of the line",
    ),
    "latin1": (
        [GOOD, json.dumps({**ROW, "question": "café"}, ensure_ascii=False).encode("latin-1")],
        r"line 2: not valid UTF-8",
    ),
    "lone-surrogate": (
        [GOOD, GOOD.replace(b"2+2", b"2\\ud8002")],
        r"line 2: column 'question': a lone surrogate escape",
    ),
    "truncated-sequence": ([GOOD.replace(b"2+2", b"2\xe2\x82")], r"line 1: not valid UTF-8"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_the_readers_refuse_text_that_is_not_utf8_naming_the_line(tmp_path, name):
    lines, message = BAD_FILES[name]
    path = jsonl(tmp_path / "raw.jsonl", lines)
    with pytest.raises(StageError, match=message):
        raw.read_local(path, "auto")
    with pytest.raises(StageError, match=message):
        line_by_line(path)


def test_a_byte_order_mark_is_no_error_and_no_content(tmp_path):
    path = jsonl(tmp_path / "raw.jsonl", [b"\xef\xbb\xbf" + GOOD, GOOD])
    table, _ = raw.read_local(path, "auto")
    assert table.column("system").to_pylist() == ["", ""]
    # a real error after a BOM is reported where it is, not as a BOM problem on line 1
    path = jsonl(tmp_path / "raw.jsonl", [b"\xef\xbb\xbf" + GOOD, b"{oops"])
    with pytest.raises(StageError, match=r"line 2: not valid JSON"):
        raw.read_local(path, "auto")


def test_a_parquet_cell_that_is_not_utf8_is_named_by_row_and_column(tmp_path):
    question = pa.array([b"fine", b"q\xffbad"], pa.binary()).view(pa.string())  # Arrow takes it unchecked
    table = pa.table({"system": ["", ""], "question": question, "chosen": ["a", "b"], "rejected": ["c", "d"]})
    pq.write_table(table, tmp_path / "raw.parquet")
    with pytest.raises(
        StageError, match=r"raw\.parquet: row index 1: column 'question': not valid UTF-8 text"
    ):
        raw.read_local(tmp_path / "raw.parquet", "auto")


def test_valid_non_ascii_text_reads_back_exactly(tmp_path):
    rows = [{**ROW, "question": q} for q in ("café", "日本語", "emoji 🙂", "tab\there", "\u2028 line sep")]
    path = jsonl(tmp_path / "raw.jsonl", [json.dumps(r, ensure_ascii=False).encode() for r in rows])
    table, _ = raw.read_local(path, "auto")
    assert table.equals(line_by_line(path)[0])
    assert table.column("question").to_pylist() == [r["question"] for r in rows]


@pytest.mark.parametrize("encoding", ["dictionary", "string_view"])
def test_parquet_text_in_other_arrow_encodings_is_read_as_text(tmp_path, encoding):
    """pandas' `category` columns are dictionary-encoded in Parquet; string_view is Arrow's newer layout."""
    questions = pa.array(["What is 2+2?", "What is 3+3?", "What is 2+2?"])
    questions = (
        questions.dictionary_encode() if encoding == "dictionary" else questions.cast(pa.string_view())
    )
    table = pa.table(
        {
            "system": ["", "", "s"],
            "question": questions,
            "chosen": ["4", "6", "4"],
            "rejected": ["5", "7", "5"],
        }
    )
    pq.write_table(table, tmp_path / "raw.parquet")
    read, schema = raw.read_local(tmp_path / "raw.parquet", "auto")
    assert schema == "orca" and read.column("question").type == pa.string()
    assert read.column("question").to_pylist() == ["What is 2+2?", "What is 3+3?", "What is 2+2?"]


def test_a_folder_as_data_path_is_named_as_a_folder(tmp_path):
    (tmp_path / "raw.jsonl").mkdir()
    with pytest.raises(
        StageError,
        match=r"raw\.jsonl: is a folder; data\.path must name one \.jsonl / \.json / \.parquet file",
    ):
        raw.read_local(tmp_path / "raw.jsonl", "auto")
