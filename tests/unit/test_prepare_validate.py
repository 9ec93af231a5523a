"""prepare: raw schema detection and structural validation (every message names file, row and column)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline.data import raw
from dpo_pipeline.errors import StageError

ROW = {"system": "", "question": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}
ORIGINAL_ROW = {"system": "", "question": "What is 2 + 2?", "chatgpt": "4.", "llama2-13b-chat": "5."}


def write_jsonl(path: Path, rows: list, lines: dict[int, str] | None = None) -> Path:
    """Rows as JSON Lines; `lines` replaces given 1-based lines with raw text."""
    text = [json.dumps(r) for r in rows]
    for number, raw_text in (lines or {}).items():
        text[number - 1] = raw_text
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def rows(n: int) -> list[dict]:
    return [dict(ROW, question=f"What is {i} + 2?") for i in range(n)]


def error_of(path: Path, columns: str = "auto") -> str:
    with pytest.raises(StageError) as info:
        raw.read_local(path, columns)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# schema detection


def detect(columns, wanted="auto", source="f", kinds=None):
    from dpo_pipeline.data.formats import detect_format

    return detect_format(columns, kinds or {"chosen": "str"}, wanted, source)


def texts(table) -> list[dict]:
    """The four text columns of an internal table (layout.RAW_COLUMNS also has history and source)."""
    return table.select(list(raw.TEXT_COLUMNS)).to_pylist()


def test_detect_current_and_original_schema_ignoring_extra_columns():
    assert detect(["system", "question", "chosen", "rejected", "extra"]) == "orca"
    assert detect(["llama2-13b-chat", "chatgpt", "question", "system"]) == "orca_original"


def test_unknown_schema_names_file_columns_found_and_expected():
    with pytest.raises(StageError) as info:
        detect(["query", "good", "bad"], source="raw/x.jsonl")
    message = str(info.value)
    assert message.startswith("raw/x.jsonl: unknown raw schema")
    assert "found columns: bad, good, query" in message
    assert "system, question, chosen, rejected" in message and "chatgpt, llama2-13b-chat" in message
    assert "hh_rlhf: chosen, rejected" in message and "or set data.format" in message


def test_both_schemas_present_asks_for_data_format():
    columns = ["system", "question", "chosen", "rejected", "chatgpt", "llama2-13b-chat"]
    with pytest.raises(StageError, match="set data.format to 'orca' or 'orca_original'"):
        detect(columns)
    assert detect(columns, "orca_original") == "orca_original"


def test_forced_schema_reports_missing_columns():
    with pytest.raises(
        StageError, match=r"f: data.format is 'orca_original' but column\(s\) chatgpt, llama2-13b-chat"
    ):
        detect(list(ROW), "orca_original")


def test_original_schema_maps_chatgpt_to_chosen(tmp_path):
    table, schema = raw.read_local(write_jsonl(tmp_path / "o.jsonl", [ORIGINAL_ROW]), "auto")
    assert schema == "orca_original"
    assert table.column_names == [*raw.TEXT_COLUMNS, "history", "source"]
    assert texts(table) == [ROW]
    assert table["history"].to_pylist() == ["[]"] and table["source"].to_pylist() == ["o"]


def test_extra_columns_are_ignored(tmp_path):
    table, schema = raw.read_local(write_jsonl(tmp_path / "x.jsonl", [dict(ROW, id=3, score=None)]), "auto")
    assert schema == "orca" and texts(table) == [ROW]


# ---------------------------------------------------------------------------------------------------------
# JSON Lines: 1-based line numbers


def test_jsonl_missing_column_names_file_line_and_column(tmp_path):
    data = rows(5)
    del data[2]["rejected"]
    path = write_jsonl(tmp_path / "raw.jsonl", data)
    assert re.match(rf"{re.escape(str(path))}: line 3: column 'rejected' is missing", error_of(path))


def test_jsonl_null_text_names_file_line_and_column(tmp_path):
    data = rows(6)
    data[4]["question"] = None
    path = write_jsonl(tmp_path / "raw.jsonl", data)
    assert error_of(path) == f"{path}: line 5: column 'question' is null where text is required"


def test_jsonl_null_system_is_an_error_too(tmp_path):
    data = rows(2)
    data[0]["system"] = None
    path = write_jsonl(tmp_path / "raw.jsonl", data)
    assert error_of(path) == f"{path}: line 1: column 'system' is null where text is required"


@pytest.mark.parametrize(("value", "kind"), [(5, "int"), (["a"], "list"), (True, "bool"), ({"a": 1}, "dict")])
def test_jsonl_non_string_names_file_line_column_and_type(tmp_path, value, kind):
    data = rows(4)
    data[3]["chosen"] = value
    path = write_jsonl(tmp_path / "raw.jsonl", data)
    assert error_of(path).startswith(f"{path}: line 4: column 'chosen': expected a string, got {kind}")


def test_jsonl_unparseable_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", rows(5), lines={4: '{"system": "", "question": "cut'})
    message = error_of(path)
    assert message.startswith(f"{path}: line 4: not valid JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", rows(3), lines={2: '["a", "b"]'})
    assert error_of(path) == f"{path}: line 2: expected a JSON object, got list"


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "raw.jsonl"
    lines = [json.dumps(r) for r in rows(3)]
    bad = dict(ROW, chosen=None)
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    assert error_of(path).startswith(f"{path}: line 4: column 'chosen'")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_is_an_error(tmp_path, content):
    path = tmp_path / "raw.jsonl"
    path.write_text(content, encoding="utf-8")
    assert error_of(path).startswith(f"{path}: no rows (empty input)")


def test_unknown_schema_in_a_file_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", [{"query": "p", "good": "c", "bad": "r"}])
    message = error_of(path)
    assert message.startswith(f"{path}: unknown raw schema") and "found columns: bad, good, query" in message


# ---------------------------------------------------------------------------------------------------------
# .json: a JSON array (row index) or JSON Lines (line number)


def test_json_array_is_read(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(rows(3), indent=2), encoding="utf-8")
    table, schema = raw.read_local(path, "auto")
    assert table.num_rows == 3 and schema == "orca"


def test_json_array_error_names_row_index_and_column(tmp_path):
    data = rows(4)
    data[2]["rejected"] = 7
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert error_of(path).startswith(f"{path}: row index 2: column 'rejected': expected a string, got int")


def test_json_lines_in_a_json_file_use_line_numbers(tmp_path):
    data = rows(3)
    data[1]["system"] = None
    path = write_jsonl(tmp_path / "raw.json", data)
    assert error_of(path) == f"{path}: line 2: column 'system' is null where text is required"


def test_json_array_unparseable_names_file_and_position(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text('[\n  {"system": "", "question": "q",\n  oops}\n]', encoding="utf-8")
    assert re.match(rf"{re.escape(str(path))}: not valid JSON \(.*; line 3, column \d+\)", error_of(path))


def test_empty_json_array_is_an_error(tmp_path):
    path = tmp_path / "raw.json"
    path.write_text("[]", encoding="utf-8")
    assert error_of(path).startswith(f"{path}: no rows (empty input)")


# ---------------------------------------------------------------------------------------------------------
# Parquet: row index


def test_parquet_is_read_with_either_schema(tmp_path):
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist([ORIGINAL_ROW, ORIGINAL_ROW]), path)
    table, schema = raw.read_local(path, "auto")
    assert schema == "orca_original" and texts(table) == [ROW, ROW]


def test_parquet_null_names_row_index_and_column(tmp_path):
    data = rows(5)
    data[3]["chosen"] = None
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(data), path)
    assert error_of(path) == f"{path}: row index 3: column 'chosen' is null where text is required"


def test_parquet_non_string_column(tmp_path):
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"system": [""], "question": [1], "chosen": ["c"], "rejected": ["r"]}), path)
    assert error_of(path).startswith(f"{path}: row index 0: column 'question': expected a string, got int64")


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"system": [""], "question": ["q"], "chosen": ["c"]}), path)
    message = error_of(path, columns="orca")
    assert message.startswith(f"{path}: data.format is 'orca' but column(s) rejected are missing")


def test_empty_parquet_is_an_error(tmp_path):
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([(c, pa.string()) for c in ROW])), path)
    assert error_of(path) == f"{path}: no rows (empty input)"


def test_corrupt_parquet_is_an_error(tmp_path):
    path = tmp_path / "raw.parquet"
    path.write_text(json.dumps(ROW), encoding="utf-8")
    assert error_of(path).startswith(f"{path}: not a readable Parquet file")


# ---------------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("name", ["raw.csv", "raw.txt", "raw"])
def test_wrong_file_type_is_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("system,question,chosen,rejected\n", encoding="utf-8")
    message = error_of(path)
    assert message.startswith(f"{path}: unsupported file type") and ".jsonl, .json, .parquet" in message


def test_missing_file_is_an_error(tmp_path):
    assert error_of(tmp_path / "nope.jsonl").startswith(f"{tmp_path / 'nope.jsonl'}: raw data file not found")


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"system": "\xff"}\n')
    assert error_of(path).startswith(f"{path}: line 1: not valid UTF-8 text (byte 13 of the line")


# ---------------------------------------------------------------------------------------------------------
# hub


def hub_source(name: str, revision: str):
    from types import SimpleNamespace

    from dpo_pipeline.data.formats import NO_FILTERS

    return SimpleNamespace(
        name=name.rsplit("/", 1)[-1],
        path="",
        hub_name=name,
        hub_revision=revision,
        hub_split="train",
        format="auto",
        filters=NO_FILTERS,
        fraction=1.0,
        max_rows=0,
    )


def test_hub_rows_go_through_datasets_with_the_pinned_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, revision=None, split=None):
        calls.append((name, revision, split))
        return datasets.Dataset.from_list([dict(ORIGINAL_ROW, extra=1)] * 2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    revision = "a" * 40
    read = raw.read_source(hub_source("Intel/orca_dpo_pairs", revision))
    assert calls == [("Intel/orca_dpo_pairs", revision, "train")]
    assert read.format == "orca_original" and read.label == f"Intel/orca_dpo_pairs@{revision} (split train)"
    assert read.raw_hash == f"Intel/orca_dpo_pairs@{revision}:train"
    assert texts(read.table) == [ROW, ROW] and read.table["source"].to_pylist() == ["orca_dpo_pairs"] * 2


def test_hub_rows_are_validated_with_the_dataset_named(monkeypatch):
    import datasets

    broken = [ROW, dict(ROW, chosen=None)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(broken))
    with pytest.raises(StageError) as info:
        raw.read_source(hub_source("org/set", "b" * 40))
    assert (
        str(info.value)
        == f"org/set@{'b' * 40} (split train): row index 1: column 'chosen' is null where text is required"
    )


# ---------------------------------------------------------------------------------------------------------
# The fast (pyarrow) JSON Lines reader and the line-by-line one agree


TRICKY = [
    'quote " backslash \\ slash /',
    "control \x00\x01\x1f \t tab \r\n crlf \b\f",
    "unicode é 日本語 emoji 😀 \u2028 line separator \u00a0 nbsp",
    "",
    "   ",
    "<|im_start|>user\nnot a real turn<|im_end|>",
]


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_tricky_text_reads_back_exactly(tmp_path, ensure_ascii):
    rows = [
        {"system": a, "question": b, "chosen": c, "rejected": d, "extra": i}
        for i, (a, b, c, d) in enumerate(
            zip(
                TRICKY, TRICKY[1:] + TRICKY[:1], TRICKY[2:] + TRICKY[:2], TRICKY[3:] + TRICKY[:3], strict=True
            )
        )
    ]
    path = tmp_path / "tricky.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")
    table, schema = raw.read_local(path, "auto")
    assert schema == "orca"
    for name in raw.TEXT_COLUMNS:
        assert table.column(name).to_pylist() == [r[name] for r in rows], name


def test_the_shipped_sample_reads_whole():
    table, schema = raw.read_local(Path("data/raw/orca_dpo_sample.jsonl"), "auto")
    assert table.num_rows == 3000 and schema == "orca"


@pytest.mark.parametrize(
    "lines, expected",
    [
        ({3: '{"system": "", "question": 7, "chosen": "c", "rejected": "r"}'}, r"line 3: column 'question'"),
        ({2: '{"system": "", "question": "q", "chosen": "c"}'}, r"line 2: column 'rejected' is missing"),
        (
            {3: '{"system": null, "question": "q", "chosen": "c", "rejected": "r"}'},
            r"line 3: column 'system' is null",
        ),
        # a key twice: json.loads alone would keep the last value, pyarrow refuses the row; both are refused
        (
            {1: '{"system": "", "question": "q", "chosen": "c", "rejected": "r", "rejected": "x"}'},
            r"line 1: key 'rejected' appears twice in the object; expected each key once",
        ),
    ],
)
def test_a_bad_row_is_named_by_its_line(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "raw.jsonl", rows(5), lines)
    with pytest.raises(StageError, match=expected):
        raw.read_local(path, "auto")
