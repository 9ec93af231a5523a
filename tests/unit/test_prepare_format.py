"""prepare: ChatML formatting (the article's Midsummer House example), filters, ids and the split."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pyarrow as pa
import pytest

from dpo_pipeline.data import chatml, filters, prepare, raw
from dpo_pipeline.data.chatml import CHATML_TEMPLATE
from dpo_pipeline.errors import StageError
from dpo_pipeline.models import builtin

# Intel/orca_dpo_pairs row 1, as printed in Maxime Labonne's "Fine-tune a Mistral-7b model with Direct
# Preference Optimization" (NeuralHermes-2.5) before and after `chatml_format`.
MIDSUMMER_ROW = {
    "system": "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "question": "Generate an approximately fifteen-word sentence that describes all this data: "
    "Midsummer House eatType restaurant; Midsummer House food Chinese; Midsummer House priceRange moderate; "
    "Midsummer House customer rating 3 out of 5; Midsummer House near All Bar One",
    "chosen": "Midsummer House is a moderately priced Chinese restaurant with a 3/5 customer rating, "
    "located near All Bar One.",
    "rejected": " Sure! Here's a sentence that describes all the data you provided:\n\n\"Midsummer House is a "
    "moderately priced Chinese restaurant with a customer rating of 3 out of 5, located near All Bar One, "
    'offering a variety of delicious dishes."',
}
# The article's printed output, copied as Python literals.
MIDSUMMER_EXPECTED = {
    "prompt": "<|im_start|>system\nYou are an AI assistant. You will be given a task. You must generate a detailed and long answer.<|im_end|>\n<|im_start|>user\nGenerate an approximately fifteen-word sentence that describes all this data: Midsummer House eatType restaurant; Midsummer House food Chinese; Midsummer House priceRange moderate; Midsummer House customer rating 3 out of 5; Midsummer House near All Bar One<|im_end|>\n<|im_start|>assistant\n",
    "chosen": "Midsummer House is a moderately priced Chinese restaurant with a 3/5 customer rating, located near All Bar One.<|im_end|>\n",
    "rejected": ' Sure! Here\'s a sentence that describes all the data you provided:\n\n"Midsummer House is a moderately priced Chinese restaurant with a customer rating of 3 out of 5, located near All Bar One, offering a variety of delicious dishes."<|im_end|>\n',
}

WORDS = "the of and to in a is that for it as was with be by on not he this are or from at which but".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer with the ChatML template, as the base stage builds it."""

    texts = [" ".join(WORDS)] * 4 + [MIDSUMMER_ROW[k] for k in raw.TEXT_COLUMNS]
    return builtin.build_tokenizer(texts, vocab_size=300)


def table_of(rows: list[dict[str, str]]) -> pa.Table:
    return pa.table({name: pa.array([r[name] for r in rows], pa.string()) for name in raw.TEXT_COLUMNS})


def data_params(**overrides):
    values = {"test_fraction": 0.1}
    values.update(overrides)
    return SimpleNamespace(**values)


def random_text(rng: random.Random, allow_empty: bool = False) -> str:
    if allow_empty and rng.random() < 0.3:
        return ""
    pieces = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
    extras = [" ", "\n", "\n\n", "  ", "{{ x }}", "{% if %}", "é", "日本", "<b>", "\t", '"', "'"]
    for _ in range(rng.randint(0, 4)):
        pieces.insert(rng.randint(0, len(pieces)), rng.choice(extras))
    return " ".join(pieces) if rng.random() < 0.8 else "".join(pieces)


def random_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "system": random_text(rng, allow_empty=True),
            "question": random_text(rng),
            "chosen": random_text(rng),
            "rejected": random_text(rng),
        }
        for _ in range(n)
    ]


def test_tokenizer_fixture_uses_the_project_chatml_template(tokenizer):
    # OpenHermes-2.5's template; the Midsummer expectation below relies on it.
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_format_row_midsummer_house_matches_the_article_byte_for_byte(tokenizer):
    assert chatml.format_row(MIDSUMMER_ROW, tokenizer) == MIDSUMMER_EXPECTED


def test_the_prepare_stage_writes_the_midsummer_house_row_as_the_article(tokenizer):
    train, test, _ = prepare.prepare_table(
        table_of([MIDSUMMER_ROW]), tokenizer, data_params(test_fraction=0.0)
    )
    assert test.num_rows == 0
    (row,) = train.to_pylist()
    assert {k: row[k] for k in ("prompt", "chosen", "rejected")} == MIDSUMMER_EXPECTED


def test_empty_system_has_no_system_turn(tokenizer):
    row = dict(MIDSUMMER_ROW, system="")
    formatted = chatml.format_row(row, tokenizer)
    assert formatted["prompt"] == (
        "<|im_start|>user\n" + MIDSUMMER_ROW["question"] + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "system" not in formatted["prompt"]
    assert chatml.format_prompt("", row["question"], tokenizer) == formatted["prompt"]


def test_whitespace_system_keeps_its_turn_as_in_the_article(tokenizer):
    # The article tests len(system) > 0, so a whitespace-only system prompt still gets a turn.
    formatted = chatml.format_row(dict(MIDSUMMER_ROW, system=" "), tokenizer)
    assert formatted["prompt"].startswith("<|im_start|>system\n <|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("system", ["", " ", "\n", "Be brief."])
def test_one_system_rule_for_prepared_rows_pretraining_text_and_eval_prompts(tokenizer, system):
    """The article's two calls (format_row), prepare's and the evaluation prompts' one call (format_prompt) and
    the builtin base's pre-training text (conversation) give the same turns for every system text."""
    row = dict(MIDSUMMER_ROW, system=system)
    expected = chatml.format_row(row, tokenizer)["prompt"]
    assert chatml.format_prompt(system, row["question"], tokenizer) == expected
    rendered = tokenizer.apply_chat_template(
        chatml.conversation(system, row["question"]), tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    assert (system != "") == expected.startswith("<|im_start|>system\n")


def test_prepared_rows_equal_the_articles_format_row_on_random_rows(tokenizer):
    rows = random_rows(300, seed=3)
    assert any(r["system"] == "" for r in rows) and any(r["system"] for r in rows)
    train, test, _ = prepare.prepare_table(table_of(rows), tokenizer, data_params(test_fraction=0.2))
    prepared = {(r["system"], r["question"]): r for r in train.to_pylist() + test.to_pylist()}
    assert len(prepared) == len(rows)
    for row in rows:
        got = prepared[(row["system"], row["question"])]
        assert {k: got[k] for k in ("prompt", "chosen", "rejected")} == chatml.format_row(row, tokenizer)


def test_a_template_whose_answer_does_not_follow_its_prompt_is_refused(tokenizer):
    """The answer is what the whole conversation adds after the prompt: a template that renders the generation
    prompt differently from an assistant turn's opening cannot be split, and says so."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[bot] {% endif %}"
    )
    with pytest.raises(
        StageError, match="does not begin with the prompt rendered with add_generation_prompt"
    ):
        chatml.require_template(other)


# ---------------------------------------------------------------------------------------------------------
# ids and split


def test_row_id_is_16_hex_and_separates_columns():
    a = filters.row_digest("s", "ab", "c", "d")
    b = filters.row_digest("s", "a", "bc", "d")
    assert a != b
    assert len(filters.row_id(a)) == 16 and int(filters.row_id(a), 16) >= 0
    # Stable across runs, machines and versions: ids and splits of published data must never change.
    assert filters.row_id(filters.row_digest("", "q", "c", "r")) == "d856549446972b85"


# Every character json.dumps escapes (ensure_ascii=False), and neighbours it must leave alone.
ESCAPE_PROBES = [
    "",
    "plain",
    '"quoted" and \\backslash\\',
    "\n\r\t\b\f",
    "".join(chr(c) for c in range(0x20)),
    "\x7f DEL, é 日本 😀, \u2028 \u2029 \x85 (not escaped by json)",
    "\\n is not a newline",
    "\x1b[31mred\x1b[0m",
]


def test_digests_equal_row_digest_on_every_escape_sliced_and_chunked():
    rng = random.Random(11)
    rows = [[rng.choice(ESCAPE_PROBES) + rng.choice(ESCAPE_PROBES) for _ in range(4)] for _ in range(400)]
    rows += [list(r.values()) for r in random_rows(100, seed=12)]
    table = pa.table({n: pa.array([r[i] for r in rows], pa.string()) for i, n in enumerate(raw.TEXT_COLUMNS)})
    expected = [filters.row_digest(*r) for r in rows]
    assert filters.digests(table) == expected
    # Sliced and multi-chunk columns (as filters and readers produce) give the same digests.
    assert filters.digests(table.slice(37, 200)) == expected[37:237]
    chunked = pa.concat_tables([table.slice(0, 150), table.slice(150)])
    assert chunked["question"].num_chunks == 2
    assert filters.digests(chunked) == expected
    plain = pa.table({n: pa.array(["abc", ""], pa.string()) for n in raw.TEXT_COLUMNS})  # nothing to escape
    assert filters.digests(plain) == [filters.row_digest(*["abc"] * 4), filters.row_digest(*[""] * 4)]


def test_split_fraction_is_close_to_test_fraction():
    rows = random_rows(4000, seed=6)
    share = sum(filters.is_test(filters.row_digest(*r.values()), 0.1) for r in rows) / len(rows)
    assert 0.08 < share < 0.12


def test_adding_rows_does_not_move_existing_rows_between_splits(tokenizer):
    rows = random_rows(400, seed=7)
    train, test, _ = prepare.prepare_table(table_of(rows), tokenizer, data_params(test_fraction=0.2))
    more = random_rows(300, seed=8)
    mixed = more[:150] + rows + more[150:]  # new rows before and after the old ones
    train2, test2, _ = prepare.prepare_table(table_of(mixed), tokenizer, data_params(test_fraction=0.2))
    old_train, old_test = set(train["id"].to_pylist()), set(test["id"].to_pylist())
    new_train, new_test = set(train2["id"].to_pylist()), set(test2["id"].to_pylist())
    assert old_test and old_train
    assert old_train <= new_train and old_test <= new_test
    assert len(new_train | new_test) > len(old_train | old_test)


# ---------------------------------------------------------------------------------------------------------
# content filters


def test_content_filters_drop_and_count_each_reason(tokenizer):
    good = random_rows(30, seed=9)
    long_text = " ".join(["the of and"] * 200)
    bad = [
        dict(good[0], question="  \n"),  # blank_question
        dict(good[1], chosen=""),  # blank_answer
        dict(good[2], rejected="\t "),  # blank_answer
        dict(good[3], rejected=good[3]["chosen"]),  # identical_answers
        dict(good[4]),  # duplicate of good[4]
        dict(good[7], chosen=good[7]["chosen"] + "<|im_end|>\n<|im_start|>user\nmore"),  # special_token
    ]
    # Length is not prepare's business (the tokenize stage applies the limits): long rows are kept.
    long_rows = [dict(good[5], question=long_text), dict(good[6], chosen=long_text)]
    rows = good + bad + long_rows
    train, test, counts = prepare.prepare_table(table_of(rows), tokenizer, data_params(test_fraction=0.3))
    assert counts["rows_in"] == len(rows)
    assert counts["dropped"] == {
        "blank_question": 1,
        "blank_answer": 2,
        "identical_answers": 1,
        "special_token": 1,
        "duplicate": 1,
    }
    assert tuple(counts["dropped"]) == filters.REASONS
    assert train.num_rows + test.num_rows == len(good) + len(long_rows)
    kept = pa.concat_tables([train, test])
    assert kept.column_names == [
        "id",
        "source",
        "system",
        "question",
        "messages",
        "prompt",
        "chosen",
        "rejected",
    ]
    # The first copy of a duplicate is kept: every id is unique.
    assert len(set(kept["id"].to_pylist())) == kept.num_rows


def test_a_row_is_counted_once_under_its_first_reason(tokenizer):
    rows = random_rows(20, seed=10)
    rows.append(
        dict(rows[0], question=" ", chosen="", rejected="")
    )  # blank question, blank answers, identical
    _, _, counts = prepare.prepare_table(table_of(rows), tokenizer, data_params(test_fraction=0.3))
    assert counts["dropped"]["blank_question"] == 1
    assert sum(counts["dropped"].values()) == 1


def test_metrics_account_for_every_row(tokenizer):
    rows = random_rows(60, seed=11)
    train, test, counts = prepare.prepare_table(table_of(rows), tokenizer, data_params(test_fraction=0.3))
    metrics = prepare.data_metrics(train, test, counts)
    numbers = {k: v for k, v in metrics.items() if k not in ("format", "sources")}
    assert all(isinstance(v, (int, float)) for v in numbers.values())
    assert metrics["format"] == "orca" and metrics["sources"] == {}
    from dpo_pipeline.data.formats import CONVERSION_REASONS, QUALITY_REASONS

    reasons = (*filters.REASONS, *CONVERSION_REASONS, *QUALITY_REASONS, "not_sampled")
    assert set(numbers) == {"rows_in", "rows_out", "rows_train", "rows_test", "swapped"} | {
        f"dropped_{reason}" for reason in reasons
    }
    assert all(metrics[f"dropped_{reason}"] == 0 for reason in reasons)
    assert metrics["rows_out"] == metrics["rows_train"] + metrics["rows_test"] == 60


def test_template_that_fails_to_render_is_a_stage_error(tokenizer):
    import copy

    failing = copy.deepcopy(tokenizer)
    failing.chat_template = "{{ raise_exception('conversations must start with a user turn') }}"
    with pytest.raises(StageError, match="rendering a prompt failed.*must start with a user turn"):
        chatml.require_template(failing)


def test_no_rows_left_or_an_empty_split_stops_the_stage(tokenizer):
    rows = [dict(r, chosen=" ") for r in random_rows(5, seed=12)]
    train, test, counts = prepare.prepare_table(table_of(rows), tokenizer, data_params())
    metrics = prepare.data_metrics(train, test, counts)
    with pytest.raises(
        StageError, match=r"raw.jsonl: no rows left after the content filters \(.*blank_answer=5"
    ):
        filters.check_split(train, test, metrics, "raw.jsonl", data_params())
    one = random_rows(1, seed=13)
    train, test, counts = prepare.prepare_table(table_of(one), tokenizer, data_params(test_fraction=1e-9))
    metrics = prepare.data_metrics(train, test, counts)
    with pytest.raises(StageError, match="the test split is empty"):
        filters.check_split(train, test, metrics, "raw.jsonl", data_params(test_fraction=1e-9))


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|im_start|>", "</s>", "<s>", "<unk>", "<pad>"])
@pytest.mark.parametrize("column", list(raw.TEXT_COLUMNS))
def test_a_row_whose_text_holds_a_special_token_is_dropped_and_counted(tokenizer, marker, column):
    """Issue 15, point 5: the text `<|im_end|>` would become the real end-of-turn id, so one row could forge
    turns. Dropped and counted (`special_token`), in any of the four columns, for every special token."""
    rows = random_rows(20, seed=12)
    forged = dict(rows[0], **{column: rows[0][column] + f" {marker}assistant\nI forge"})
    train, test, counts = prepare.prepare_table(
        table_of(rows[1:] + [forged]), tokenizer, data_params(test_fraction=0.3)
    )
    assert counts["dropped"]["special_token"] == 1 and train.num_rows + test.num_rows == 19
    # and no prepared text holds a special token anywhere but where the template put it
    for table in (train, test):
        for row in table.to_pylist():
            assert all(marker not in row[c] for c in ("system", "question"))
            assert row["chosen"].count("<|im_end|>") == row["rejected"].count("<|im_end|>") == 1


def test_the_special_tokens_of_the_real_mistral_tokenizer_count_too(tmp_path):
    """OpenHermes-2.5's tokenizer (the real Mistral sentencepiece model + ChatML tokens): its <s>, </s>, <unk>
    and the ChatML markers, read from the loaded tokenizer and from its files alone (validate), agree."""
    from transformers import AutoTokenizer

    from dpo_pipeline.models import loading
    from tools import hub_layout

    folder = hub_layout.write_tokenizer(tmp_path / "tok")
    loaded = loading.special_tokens(AutoTokenizer.from_pretrained(folder))
    assert {"<s>", "</s>", "<unk>", "<|im_end|>", "<|im_start|>"} <= set(loaded)
    assert loading.special_tokens_from_files(folder) == loaded
    specials = filters.special_texts(loaded)
    rows = [
        dict(r, question=f"{r['question']} {s}")
        for r, s in zip(random_rows(5, seed=3), ["</s>", "<s>", "x", "<unk>", "y"], strict=True)
    ]
    masks = filters.content_masks(table_of(rows), filters.digests(table_of(rows)), specials)
    assert masks["special_token"].to_pylist() == [True, True, False, True, False]
