"""Raw formats (dpo_pipeline/data/formats.py): detection, one test per format on its shipped sample and on hand-made
rows, implicit-prompt splits, the quality filters counted per reason, mixtures with per-source counts and shares,
and the errors that name file, row, column and what was expected."""

from __future__ import annotations

import json
import typing
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline import config
from dpo_pipeline.data import filters, formats, prepare, raw
from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import RAW_COLUMNS
from tools import make_format_samples

SAMPLES = Path("data/raw/formats")
EXPECTED = {
    "conversational.jsonl": "conversational",
    "hh_rlhf.jsonl": "hh_rlhf",
    "ultrafeedback.parquet": "ultrafeedback",
    "argilla_orca.parquet": "argilla_orca",
    "standard.jsonl": "standard",
}


def params(**data):
    """params.yaml with these data.* keys replaced, parsed (and checked) as the stages load it."""
    return config.parse(_data_yaml(data), "params.yaml")


def _data_yaml(data: dict) -> dict:
    import yaml

    loaded = yaml.safe_load(Path("params.yaml").read_text())
    loaded["data"].update(data)
    return loaded


def filters_of(**values):
    base = dict(
        drop_ties=False, min_chosen_score=None, min_score_margin=None, drop_flagged=[], swap_disagreeing=False
    )
    return SimpleNamespace(**{**base, **values})


def read(path: Path, wanted: str = "auto", **filter_values):
    return raw.to_internal(raw._load_local(path), wanted, filters_of(**filter_values), str(path), path.stem)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_the_format_names_agree_with_the_params_schema():
    assert typing.get_args(config.DataFormat) == ("auto", *formats.FORMATS)
    assert set(formats.REQUIRED) == set(formats.FORMATS)


def test_the_shipped_samples_are_what_the_generator_writes(tmp_path):
    written = make_format_samples.make(
        Path("data/raw/orca_dpo_sample.jsonl"), tmp_path, make_format_samples.ROWS, 7
    )
    assert sorted(p.name for p in written) == sorted(EXPECTED)
    for path in written:
        assert path.read_bytes() == (SAMPLES / path.name).read_bytes(), path.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_is_detected_and_read_whole(name):
    table, fmt, counts = read(SAMPLES / name)
    assert fmt == EXPECTED[name]
    assert counts["rows_in"] == table.num_rows == make_format_samples.ROWS
    assert table.column_names == list(RAW_COLUMNS)
    assert set(table["source"].to_pylist()) == {Path(name).stem}
    for column in ("question", "chosen", "rejected"):
        assert all(text.strip() for text in table[column].to_pylist())


def test_multi_turn_conversations_keep_every_turn_in_order():
    rows = [json.loads(line) for line in (SAMPLES / "conversational.jsonl").read_text().splitlines()]
    table, _fmt, _counts = read(SAMPLES / "conversational.jsonl")
    for source, got in zip(rows, table.to_pylist(), strict=True):
        if "prompt" in source:
            prompt = source["prompt"]
        else:  # implicit: everything but the last message of the chosen conversation
            prompt = source["chosen"][:-1]
        system = prompt[0]["content"] if prompt[0]["role"] == "system" else ""
        earlier = prompt[1:-1] if system else prompt[:-1]
        assert got["system"] == system and got["question"] == prompt[-1]["content"]
        assert formats.history_messages(got["history"]) == earlier
        assert got["chosen"] == source["chosen"][-1]["content"]
        assert got["rejected"] == source["rejected"][-1]["content"]
    assert max(len(formats.history_messages(h)) for h in table["history"].to_pylist()) == 6  # three exchanges


def test_implicit_prompts_split_at_the_longest_common_prefix_and_bad_splits_are_counted(tmp_path):
    a = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?")]
    rows = [
        {"chosen": [*a, msg("assistant", "4")], "rejected": [*a, msg("assistant", "5")]},  # kept
        {"chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]},  # no prompt
        {"chosen": [*a, msg("assistant", "4")], "rejected": [*a, msg("assistant", "4")]},  # no answer left
        {
            "chosen": [*a[:2], msg("assistant", "x"), a[3], msg("assistant", "4")],
            "rejected": [*a, msg("assistant", "5")],
        },
        {
            "chosen": [*a[:3], msg("assistant", "4")],
            "rejected": [*a[:3], msg("assistant", "5")],
        },  # ends on assistant
    ]
    table, fmt, counts = read(write_jsonl(tmp_path / "c.jsonl", rows))
    assert fmt == "conversational" and table.num_rows == 1
    assert counts["no_prompt"] == 2 and counts["not_one_answer"] == 2
    (row,) = table.to_pylist()
    assert (row["system"], row["question"], row["chosen"], row["rejected"]) == ("Be brief.", "2+2?", "4", "5")
    assert formats.history_messages(row["history"]) == a[1:3]


def test_an_explicit_prompt_list_and_answers_that_repeat_it(tmp_path):
    prompt = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Name a colour.")]
    rows = [
        {"prompt": prompt, "chosen": [msg("assistant", "Blue.")], "rejected": [msg("assistant", "No.")]},
        {
            "prompt": prompt,
            "chosen": [*prompt, msg("assistant", "Red.")],
            "rejected": [*prompt, msg("assistant", "?")],
        },
    ]
    table, fmt, _ = read(write_jsonl(tmp_path / "e.jsonl", rows))
    assert fmt == "conversational"
    assert (
        table["chosen"].to_pylist() == ["Blue.", "Red."]
        and table["question"].to_pylist() == ["Name a colour."] * 2
    )


def test_hh_rlhf_transcripts(tmp_path):
    turns = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?"
    rows = [{"chosen": turns + "\n\nAssistant: 4", "rejected": turns + "\n\nAssistant: five"}]
    table, fmt, _ = read(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert fmt == "hh_rlhf"
    (row,) = table.to_pylist()
    assert row["question"] == "What is 2+2?" and (row["chosen"], row["rejected"]) == ("4", "five")
    assert formats.history_messages(row["history"]) == [msg("user", "Hi there"), msg("assistant", "Hello!")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"chosen": "Human: hi", "rejected": turns}])
    with pytest.raises(
        StageError, match=r"bad\.jsonl: line 2: column 'chosen': expected an hh-rlhf transcript"
    ):
        read(bad)


def test_ultrafeedback_rows_and_scores():
    table, fmt, counts = read(SAMPLES / "ultrafeedback.parquet", min_score_margin=0.5)
    source = pq.read_table(SAMPLES / "ultrafeedback.parquet").to_pylist()
    assert fmt == "ultrafeedback"
    low = [r for r in source if r["score_chosen"] - r["score_rejected"] < 0.5]
    assert counts["low_margin"] == len(low) > 0 and table.num_rows == len(source) - len(low)
    assert table["question"].to_pylist() == [r["prompt"] for r in source if r not in low]


def test_argillas_card_filter_drops_and_counts_each_reason():
    """status != tie, chosen_score >= 8, not in_gsm8k_train: the counts equal the same filter computed here from
    the raw columns (each row under its first reason: flagged, tie, unscored, low_chosen_score)."""
    source = pq.read_table(SAMPLES / "argilla_orca.parquet").to_pylist()
    table, fmt, counts = read(
        SAMPLES / "argilla_orca.parquet",
        drop_ties=True,
        min_chosen_score=8.0,
        drop_flagged=["in_gsm8k_train"],
    )
    assert fmt == "argilla_orca"
    flagged = [r for r in source if r["in_gsm8k_train"]]
    rest = [r for r in source if not r["in_gsm8k_train"]]
    ties = [r for r in rest if r["status"] == "tie"]
    low = [r for r in rest if r["status"] != "tie" and r["chosen_score"] < 8.0]
    assert (counts["flagged"], counts["tie"], counts["low_chosen_score"]) == (
        len(flagged),
        len(ties),
        len(low),
    )
    assert min(len(flagged), len(ties), len(low)) > 0
    assert table.num_rows == len(source) - len(flagged) - len(ties) - len(low)


def test_swap_disagreeing_swaps_the_answers_the_scores_disagree_with(tmp_path):
    rows = [json.loads(line) for line in (SAMPLES / "conversational.jsonl").read_text().splitlines()]
    table, _, counts = read(SAMPLES / "conversational.jsonl", swap_disagreeing=True)
    disagree = [i for i, r in enumerate(rows) if r["score_rejected"] > r["score_chosen"]]
    assert counts["swapped"] == len(disagree) > 0
    for i in disagree:
        assert table["chosen"][i].as_py() == rows[i]["rejected"][-1]["content"]
        assert table["rejected"][i].as_py() == rows[i]["chosen"][-1]["content"]


@pytest.mark.parametrize(
    "name, values, expected",
    [
        ("hh_rlhf.jsonl", {"min_chosen_score": 5.0}, "min_chosen_score needs a chosen score"),
        ("standard.jsonl", {"drop_ties": True}, "drop_ties needs both scores or a status column"),
        ("argilla_orca.parquet", {"drop_flagged": ["in_mmlu"]}, "drop_flagged names column 'in_mmlu'"),
    ],
)
def test_a_filter_the_source_cannot_give_is_refused(name, values, expected):
    with pytest.raises(StageError, match=f"{name}: data.filters: {expected}.*the filter would do nothing"):
        read(SAMPLES / name, **values)


def test_the_orca_formats_refuse_every_filter():
    with pytest.raises(StageError, match="format orca is read as the four orca text columns"):
        read(Path("data/raw/orca_dpo_sample.jsonl"), drop_ties=True)


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"chosen": "x", "rejected": [msg("assistant", "y")]},
            r"line 1: column 'chosen': expected a list of \{role, content\}",
        ),
        (
            {"chosen": [["user", "q"]], "rejected": []},
            r"line 1: column 'chosen': message 0: expected an object",
        ),
        (
            {"chosen": [{"role": "user", "content": "q", "name": "a"}], "rejected": []},
            "message 0: key 'name' is not supported",
        ),
        (
            {"chosen": [{"role": "user", "content": 3}], "rejected": []},
            "message 0: content must be a string, got number",
        ),
        (
            {"chosen": [msg("user", "q\ud800")], "rejected": []},
            r"column 'chosen\[0\]\.content': a lone surrogate",
        ),
        (
            {
                "chosen": [msg("user", "q"), msg("assistant", "a")],
                "rejected": [msg("user", "q"), msg("assistant", "b")],
                "score_chosen": "9",
            },
            "column 'score_chosen': expected a number or null",
        ),
    ],
)
def test_bad_message_rows_name_file_line_and_column(tmp_path, row, expected):
    path = tmp_path / "conv.jsonl"
    path.write_text(
        json.dumps(
            {
                "chosen": [msg("user", "a"), msg("assistant", "b")],
                "rejected": [msg("user", "a"), msg("assistant", "c")],
            }
        )
        + "\n"
        + json.dumps(row)
        + "\n"
    )
    with pytest.raises(StageError, match=expected.replace("line 1", "line 2")) as info:
        read(path, "conversational")
    assert str(info.value).startswith(f"{path}: line 2: ")


def test_a_nested_parquet_text_that_is_not_utf8_is_refused(tmp_path):
    content = pa.array([b"fine", b"q\xffbad"], pa.binary()).view(pa.string())
    messages = pa.ListArray.from_arrays(
        pa.array([0, 1, 2], pa.int32()),
        pa.StructArray.from_arrays([pa.array(["assistant", "assistant"]), content], ["role", "content"]),
    )
    prompt = pa.array([[{"role": "user", "content": "q"}]] * 2)
    pq.write_table(
        pa.table({"prompt": prompt, "chosen": messages, "rejected": messages}), tmp_path / "c.parquet"
    )
    with pytest.raises(StageError, match="c.parquet: a nested column holds text that is not valid UTF-8"):
        read(tmp_path / "c.parquet")


# ---------------------------------------------------------------------------------------------------------
# Mixtures and shares


def mix_params(tmp_path: Path, sources: list[dict]):
    return params(source="mix", path=str(tmp_path), sources=sources)


def test_a_mixture_prepares_with_per_source_counts(tmp_path):
    from dpo_pipeline.models import builtin

    for name in ("conversational.jsonl", "ultrafeedback.parquet"):
        (tmp_path / name).write_bytes((SAMPLES / name).read_bytes())
    p = mix_params(
        tmp_path,
        [
            {"name": "chat", "path": str(tmp_path / "conversational.jsonl"), "max_rows": 100},
            {
                "name": "uf",
                "path": str(tmp_path / "ultrafeedback.parquet"),
                "fraction": 0.5,
                "filters": {
                    "drop_ties": True,
                    "min_chosen_score": None,
                    "min_score_margin": None,
                    "drop_flagged": [],
                    "swap_disagreeing": False,
                },
            },
        ],
    )
    assert p.data.sources[0].format == "auto" and p.data.sources[0].fraction == 1.0  # inherited
    assert p.data.sources[1].filters.drop_ties and not p.data.sources[0].filters.drop_ties
    reads = prepare.read_all(p.data)
    table, summary = prepare.combine(reads, p.data)
    tokenizer = builtin.build_tokenizer(["a b c"] * 3, vocab_size=300)
    train, test, counts = prepare.prepare_table(table, tokenizer, p.data, summary)
    metrics = prepare.data_metrics(train, test, counts)
    chat, uf = metrics["sources"]["chat"], metrics["sources"]["uf"]
    assert metrics["format"] == "mixed" and (chat["format"], uf["format"]) == (
        "conversational",
        "ultrafeedback",
    )
    assert chat["dropped_not_sampled"] == 300 and chat["rows_out"] == 100
    source = pq.read_table(SAMPLES / "ultrafeedback.parquet").to_pylist()
    ties = sum(r["score_chosen"] == r["score_rejected"] for r in source)
    assert uf["dropped_tie"] == ties > 0
    assert uf["rows_out"] + uf["dropped_not_sampled"] == 400 - ties  # no content drops in the samples
    assert 0.35 < uf["rows_out"] / (400 - ties) < 0.65
    kept = pa.concat_tables([train, test])
    assert sorted(set(kept["source"].to_pylist())) == ["chat", "uf"]
    assert (
        metrics["rows_in"]
        == 800
        == metrics["rows_out"] + sum(v for k, v in metrics.items() if k.startswith("dropped_"))
    )


def test_a_share_keeps_the_rows_it_gave_when_rows_are_added(tmp_path):
    table, _, _ = read(SAMPLES / "standard.jsonl")
    first, _ = filters.take_share(table.slice(0, 300), 0.5, 0)
    more, _ = filters.take_share(table, 0.5, 0)
    assert set(first["question"].to_pylist()) <= set(more["question"].to_pylist())
    capped, left_out = filters.take_share(table, 1.0, 50)
    assert capped.num_rows == 50 and left_out == 350


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"sources": [{"name": "a", "path": "x.jsonl"}]},
            "data.sources: expected [] when data.source is local",
        ),
        ({"source": "mix"}, "data.sources: expected at least one source when data.source is mix"),
        (
            {"source": "mix", "path": "data/raw", "sources": [{"name": "a", "path": "elsewhere/x.jsonl"}]},
            "data.sources[0].path: expected a file inside data.path",
        ),
        (
            {
                "source": "mix",
                "path": "data/raw",
                "sources": [
                    {"name": "a", "path": "data/raw/x.jsonl"},
                    {"name": "a", "path": "data/raw/y.jsonl"},
                ],
            },
            "data.sources[1].name: expected a unique name",
        ),
        (
            {
                "source": "mix",
                "path": "data/raw",
                "sources": [{"name": "a", "path": "data/raw/x.jsonl", "hub_name": "o/d"}],
            },
            "data.sources[0]: expected exactly one of path",
        ),
        (
            {"source": "mix", "path": "data/raw", "sources": [{"name": "h", "hub_name": "o/d"}]},
            "data.sources[0].hub_revision: expected a 40-hex commit sha",
        ),
        ({"source": "mix", "path": "data/raw", "sources": ["x"]}, "data.sources[0]: expected a mapping"),
        ({"fraction": 0.0}, "data.fraction: expected a number in (0, 1]"),
        ({"max_rows": -1}, "data.max_rows: expected an integer >= 0"),
        (
            {
                "filters": {
                    "drop_ties": False,
                    "min_chosen_score": float("nan"),
                    "min_score_margin": None,
                    "drop_flagged": [],
                    "swap_disagreeing": False,
                }
            },
            "data.filters.min_chosen_score: expected a finite number",
        ),
        ({"columns": "auto"}, "data.columns: unknown key"),
    ],
)
def test_bad_data_params_name_the_key(data, expected):
    with pytest.raises(config.ConfigError) as info:
        params(**data)
    assert expected in str(info.value), str(info.value)


def test_one_source_is_named_after_its_file_or_dataset():
    p = params()
    (only,) = config.sources(p.data)
    assert only.name == "orca_dpo_sample" and only.path == p.data.path and only.filters == p.data.filters
    hub = replace(p.data, source="hub", hub_name="Intel/orca_dpo_pairs", hub_revision="a" * 40)
    assert config.sources(hub)[0].name == "orca_dpo_pairs" and config.sources(hub)[0].path == ""


def test_generated_conversational_files_give_a_table_or_an_error_naming_the_line(tmp_path):
    """Random conversational rows, some broken in one of many ways (wrong types, nulls, missing keys, extra keys,
    lone surrogates, empty lists): every file reads to a table or fails with a StageError naming the file and the
    line (or the column no row has); nothing else escapes (no KeyError, no UnicodeEncodeError later in a tokenizer)."""
    import random
    import re

    def good(rng):
        turns = [msg("user", f"q{rng.randint(0, 9)}")]
        for _ in range(rng.randint(0, 2)):
            turns += [msg("assistant", "a"), msg("user", "q")]
        return {"chosen": [*turns, msg("assistant", "yes")], "rejected": [*turns, msg("assistant", "no")]}

    breaks = [
        lambda r: r.update(chosen="text"),
        lambda r: r.update(chosen=None),
        lambda r: r.pop("rejected"),
        lambda r: r["chosen"].append(["user", "x"]),
        lambda r: r["chosen"][0].update(role=None),
        lambda r: r["chosen"][0].update(content=7),
        lambda r: r["chosen"][0].update(extra="x"),
        lambda r: r["chosen"][0].pop("content"),
        lambda r: r["rejected"][-1].update(content="bad \ud800"),
        lambda r: r.update(chosen=[]),
        lambda r: r.update(prompt="not a list"),
        lambda r: r.update(score_chosen=[1]),
    ]
    outcomes = {"table": 0, "error": 0}
    for case in range(120):
        rng = random.Random(case)
        rows = [good(rng) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.7:
            rng.choice(breaks)(rows[rng.randrange(len(rows))])
        path = tmp_path / f"case{case}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        try:
            table, _fmt, counts = read(path, "conversational")
        except StageError as err:
            outcomes["error"] += 1
            # a row is named by its line; a column no row has is named for the file
            named = rf"{re.escape(str(path))}: (line \d+: |data\.format is 'conversational' but column\(s\))"
            assert re.match(named, str(err)), str(err)
            continue
        outcomes["table"] += 1
        assert table.num_rows + counts["no_prompt"] + counts["not_one_answer"] == len(rows)
        for column in table.column_names:
            for value in table[column].to_pylist():
                value.encode("utf-8")  # every text has a UTF-8 form
    assert outcomes["table"] > 20 and outcomes["error"] > 40, outcomes
