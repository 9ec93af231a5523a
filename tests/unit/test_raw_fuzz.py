"""Issue 15: the raw readers fuzzed. Generated files (random text with escapes and odd characters, mixed
schemas, and then corruptions: flipped or invalid bytes, truncations, Latin-1 lines, duplicate keys, two objects
on a line, an object over two lines, BOMs, CRLFs, nulls, numbers) go to every reader of raw rows: read_local,
the line-by-line reader alone, and the builtin corpus reader.

Asserted for every file: all readers agree (the same table, or the same error); an error is one StageError
that starts with the file and names the line or row, unless it is about the whole file (no rows, its
columns); a table's every string is valid UTF-8 (encodes and decodes to itself) and the content filters and
split run on it. Parquet gets the same rows (and corrupted Parquet bytes). Seeded: the same files every run;
a few seconds in all.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline.data import filters, prepare, raw
from dpo_pipeline.errors import StageError


def read_by_line(path):
    """The JSON rows read by read_json_rows, then converted as read_local converts them: (table, format)."""
    from dpo_pipeline.data.formats import NO_FILTERS

    table, fmt, _counts = raw.to_internal(
        ("json", *raw.read_json_rows(path)), "auto", NO_FILTERS, str(path), path.stem
    )
    return table, fmt


CASES = 300
PIECES = [
    "word",
    " ",
    "\n",
    "\t",
    "é",
    "日本語",
    "🙂",
    "\u2028",
    "\u0085",
    "\x7f",
    '"',
    "\\",
    "{",
    "}",
    "[",
    "]",
    "<b>",
    "\u00a0",
    "\ufeff",
    "<|im_end|>",
    "</s>",
    "\r",
]
CURRENT, ORIGINAL = raw.SCHEMAS["current"], raw.SCHEMAS["original"]
WHOLE_FILE = re.compile(
    r"no rows \(empty input\)|unknown raw schema|columns of both orca schemas|data\.format is|not a readable Parquet file"
)
PLACE = re.compile(r": (line \d+|row index \d+)\b|\(.*; line \d+, column \d+\)")


def text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))


def row(rng: random.Random, columns) -> dict:
    out = {name: text(rng) for name in columns}
    if rng.random() < 0.2:
        out["extra"] = rng.choice([1, 2.5, None, [1, "x"], {"k": "v"}, "s"])
    return out


def encode(value: dict, rng: random.Random) -> bytes:
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8")


CORRUPTIONS = []


def corruption(fn):
    CORRUPTIONS.append(fn)
    return fn


@corruption
def flip_byte(lines, rng):
    i = rng.randrange(len(lines))
    if lines[i]:
        j = rng.randrange(len(lines[i]))
        lines[i] = lines[i][:j] + bytes([rng.randrange(256)]) + lines[i][j + 1 :]


@corruption
def invalid_utf8(lines, rng):
    i = rng.randrange(len(lines))
    j = lines[i].find(b'"', 3) + 1 or 1
    lines[i] = (
        lines[i][:j]
        + rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"])
        + lines[i][j:]
    )


@corruption
def latin1_line(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = json.dumps({n: "café" for n in CURRENT}, ensure_ascii=False).encode("latin-1")


@corruption
def lone_surrogate(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i].replace(b'"question": "', b'"question": "\\udc80', 1)


@corruption
def truncate(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]


@corruption
def duplicate_key(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i].replace(b"{", b'{"chosen": "first", ', 1)


@corruption
def two_on_a_line(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i] + rng.choice([b" ", b"", b"\t"]) + lines[rng.randrange(len(lines))]


@corruption
def object_over_two_lines(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i].replace(b", ", b",\n", 1)


@corruption
def bom_and_crlf(lines, rng):
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    for i in range(len(lines)):
        if rng.random() < 0.5:
            lines[i] += b"\r"


@corruption
def blank_lines(lines, rng):
    for _ in range(rng.randint(1, 3)):
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([b"", b"  ", b"\t", b"\xc2\xa0"]))


@corruption
def wrong_value(lines, rng):
    i = rng.randrange(len(lines))
    try:
        value = json.loads(lines[i])
    except ValueError:  # an earlier corruption broke the line already
        return
    if isinstance(value, dict) and value:
        value[rng.choice(list(value))] = rng.choice([None, 3, 1.5, True, ["a"], {"a": "b"}])
        lines[i] = json.dumps(value).encode()


@corruption
def not_an_object(lines, rng):
    lines[rng.randrange(len(lines))] = rng.choice([b"[1, 2]", b'"text"', b"3", b"null"])


@corruption
def missing_column(lines, rng):
    i = rng.randrange(len(lines))
    lines[i] = lines[i].replace(b'"rejected"', b'"rejectd"', 1).replace(b'"llama2-13b-chat"', b'"llama"', 1)


def generate(seed: int) -> bytes:
    rng = random.Random(seed)
    schema = rng.choice([CURRENT, ORIGINAL])
    rows = [row(rng, schema) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.1:
        rows.append(row(rng, ORIGINAL if schema is CURRENT else CURRENT))  # mixed schemas
    lines = [encode(r, rng) for r in rows]
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):  # a third of the files stay valid
        rng.choice(CORRUPTIONS)(lines, rng)
    return b"\n".join(lines) + (b"\n" if rng.random() < 0.8 else b"")


def outcome(read, *args):
    try:
        table = read(*args)
    except StageError as err:
        return ("error", str(err))
    return ("table", table)


def as_rows(result) -> list[dict] | None:
    kind, value = result
    if kind == "error":
        return None
    table = value[0] if isinstance(value, tuple) else value
    return table.to_pylist() if hasattr(table, "to_pylist") else value


def check_error(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    assert PLACE.search(message) or WHOLE_FILE.search(message), f"names no line or row: {message}"


def check_table(table) -> None:
    for name in table.column_names:
        for value in table[name].to_pylist():
            assert value.encode("utf-8").decode("utf-8") == value
    rows, _counts, _digests = prepare.split_rows(
        table, SimpleNamespace(test_fraction=0.3), filters.special_texts(["</s>"])
    )
    assert sorted(rows["train"] + rows["test"]) == sorted(set(rows["train"] + rows["test"]))


def test_every_reader_gives_the_same_verdict_on_generated_files(tmp_path):
    seen = {"error": 0, "table": 0}
    for seed in range(CASES):
        path = tmp_path / f"case{seed}.jsonl"
        path.write_bytes(generate(seed))
        local = outcome(raw.read_local, path, "auto")
        by_line = outcome(read_by_line, path)
        corpus = outcome(raw.read_corpus, path)
        seen[local[0]] += 1
        where = f"seed {seed}: {path.read_bytes()[:300]!r}"
        assert local[0] == by_line[0] == corpus[0], where
        if local[0] == "error":
            assert local[1] == by_line[1] == corpus[1], where
            check_error(local[1], path)
            continue
        assert local[1][0].equals(by_line[1][0]) and local[1][1] == by_line[1][1], where
        assert as_rows(local) == corpus[1], where
        check_table(local[1][0])
        # the same rows as Parquet read back the same
        parquet = path.with_suffix(".parquet")
        pq.write_table(local[1][0], parquet)
        assert raw.read_local(parquet, "auto")[0].equals(local[1][0])
    assert seen["error"] > CASES // 3 and seen["table"] > CASES // 5, seen  # both sides really exercised


@pytest.mark.parametrize("seed", range(3))
def test_corrupted_parquet_bytes_give_a_clear_error_or_valid_text(tmp_path, seed):
    rng = random.Random(seed)
    rows = [row(rng, CURRENT) for _ in range(8)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in CURRENT} for r in rows]), good, compression="none")
    data = good.read_bytes()
    for case in range(40):
        broken = bytearray(data)
        if case % 2:
            broken = broken[: rng.randrange(len(broken))]
        else:
            for _ in range(rng.randint(1, 4)):
                broken[rng.randrange(4, len(broken) - 8)] = rng.randrange(256)  # keep the magic bytes
        path = tmp_path / f"case{case}.parquet"
        path.write_bytes(bytes(broken))
        result = outcome(raw.read_local, path, "auto")
        if result[0] == "error":
            check_error(result[1], path)
        else:
            check_table(result[1][0])
