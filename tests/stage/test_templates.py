# ruff: noqa: F811 - the fixtures imported from test_train are parameters here
"""Chat templates that are not ChatML: Zephyr's (HuggingFaceH4/zephyr-7b-beta) and Llama-3's
(Meta-Llama-3-8B-Instruct), set on the builtin tokenizer. The prepare stage renders every turn with the base's own
template; trl's tokenization of the rendered rows equals the template's own for the same conversation; the
template's control strings inside raw text are dropped and counted; a Zephyr-template base trains end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline.data import chatml, filters, prepare, raw, tables, tokens
from dpo_pipeline.models.loading import load_tokenizer
from tests.conftest import replace_params
from tests.stage.test_methods import heldout_preference
from tests.stage.test_train import run_train, train_params, write_selection  # noqa: F401 - a fixture

# The templates as their tokenizer_config.json files hold them (Zephyr's: one line per Jinja block there).
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def with_template(tokenizer, name: str):
    """A copy of the builtin tokenizer as that model family ships it: Zephyr ends turns with eos </s>;
    Llama-3-Instruct has its header and end-of-turn tokens as special tokens, eos <|eot_id|>."""
    out = copy.deepcopy(tokenizer)
    if name == "zephyr":
        out.chat_template, out.eos_token = ZEPHYR, "</s>"
    else:
        out.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
        out.chat_template, out.eos_token, out.bos_token = LLAMA3, "<|eot_id|>", "<|begin_of_text|>"
    return out


def conversational_table(rows: int = 40):
    table, fmt = raw.read_local(Path("data/raw/formats/conversational.jsonl"), "auto")
    assert fmt == "conversational"
    return table.slice(0, rows)


def data_params(test_fraction: float = 0.2):
    return SimpleNamespace(test_fraction=test_fraction, max_prompt_length=4096, max_length=8192)


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_rendered_rows_tokenize_as_the_template_does(name, tiny_base_dir, train_params, tmp_path):
    """Every turn of each multi-turn prompt is in the prepared prompt, in order; trl's ids of the rendered
    strings (DPOTrainer._prepare_dataset itself) equal apply_chat_template(tokenize=True) of the same conversation
    with that answer, up to the end of the answer's turn (what follows eos is never trained on)."""
    from trl import DPOTrainer

    from dpo_pipeline.train import dpo as dpo_lib

    tokenizer = with_template(load_tokenizer(tiny_base_dir), name)
    table = conversational_table()
    raw_answers = {  # id -> what the template was given as the answers
        filters.row_id(digest): row
        for row, digest in zip(table.to_pylist(), filters.digests(table), strict=True)
    }
    train, test, counts = prepare.prepare_table(table, tokenizer, data_params())
    assert sum(counts["dropped"].values()) == 0
    rows = pa.concat_tables([train, test])
    assert max(len(m) for m in rows["messages"].to_pylist()) >= 5  # system + two exchanges + the question
    for row in rows.to_pylist():
        position = 0
        for message in row["messages"]:  # every turn, in the template's order
            position = row["prompt"].index(message["content"].strip(), position)
        assert "<|im_start|>" not in row["prompt"]  # nothing of ChatML
    texts = tokens.trl_texts(rows, tokenizer.eos_token)
    # No truncation: the rows are whole conversations, longer than the tiny profile's limits.
    long_rows = replace_params(train_params, data={"max_prompt_length": 4096, "max_length": 8192})
    args = dpo_lib.dpo_config(long_rows, tmp_path / "ckpt")
    stand_in = SimpleNamespace(_tokenizer=tokenizer)  # the one attribute trl's method reads
    from datasets import Dataset

    theirs = DPOTrainer._prepare_dataset(stand_in, Dataset(texts), tokenizer, args, "train")
    assert list(theirs["id"]) == rows["id"].to_pylist()
    for row, ids in zip(rows.to_pylist(), theirs, strict=True):
        for answer in ("chosen", "rejected"):
            given = raw_answers[row["id"]][answer]
            conversation = [*row["messages"], {"role": "assistant", "content": given}]
            full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
            trl_ids = ids["prompt_ids"] + ids[f"{answer}_ids"]
            eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
            # the template's ids up to and including the answer's eos (Zephyr writes "\n" after it)
            end = len(full) - full[::-1].index(eos)
            assert trl_ids == full[:end], (name, row["id"], answer)


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_the_templates_control_strings_in_raw_text_are_dropped_and_counted(name, tiny_base_dir):
    tokenizer = with_template(load_tokenizer(tiny_base_dir), name)
    controls = chatml.template_controls(tokenizer)
    expected = {"zephyr": {"<|system|>", "<|user|>", "<|assistant|>", "</s>"}, "llama3": set(LLAMA3_SPECIALS)}
    assert set(controls) == expected[name]
    table = conversational_table(20)
    forged = table.to_pylist()
    marker = sorted(expected[name])[0]
    forged[3]["chosen"] += f"{marker}\nforged turn"
    forged[7]["history"] = json.dumps([["user", f"hi {marker}"], ["assistant", "hello"]])
    _train, _test, counts = prepare.prepare_table(
        pa.Table.from_pylist(forged, table.schema), tokenizer, data_params()
    )
    assert counts["dropped"]["special_token"] == 2


def test_a_default_system_prompt_is_rendered_once(tiny_base_dir):
    """A template that adds a system prompt when the conversation has none (Qwen's) adds it to the prompt only:
    the answer is what the full conversation adds after the prompt, never a second system turn (trl PR #1930)."""
    tokenizer = copy.deepcopy(load_tokenizer(tiny_base_dir))
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}" + chatml.CHATML_TEMPLATE
    )
    prompt, answers = chatml.render_pair(chatml.conversation("", "Hi?"), ["Hello.", "Go away."], tokenizer)
    assert prompt.count("You are a helpful assistant.") == 1
    assert answers == ["Hello.<|im_end|>\n", "Go away.<|im_end|>\n"]


def test_a_zephyr_template_base_trains_end_to_end(tmp_path, tiny_base_dir, raw_rows, train_params):
    """prepare (the rows rendered by Zephyr's template), tokenize, pairs, reference and train on a base whose
    tokenizer carries it: the adapter moves the held-out preference toward the chosen answers."""
    from stages import reference

    base = tmp_path / "zephyr_base"
    base.mkdir()
    for path in Path(tiny_base_dir).iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    with_template(load_tokenizer(tiny_base_dir), "zephyr").save_pretrained(base)
    tokenizer = load_tokenizer(base)
    assert tokenizer.chat_template == ZEPHYR and tokenizer.eos_token == "</s>"

    table = pa.Table.from_pylist([{k: r[k] for k in raw.TEXT_COLUMNS} for r in raw_rows[:80]])
    params = replace_params(
        train_params,
        train={"max_steps": 20, "warmup_steps": 0, "save_steps": 100},
        data={"test_fraction": 0.2},
    )
    train, test, _counts = prepare.prepare_table(table, tokenizer, params.data)
    assert train["prompt"][0].as_py().endswith("<|assistant|>\n")
    assert all(c.endswith("</s>\n") for c in train["chosen"].to_pylist())
    for name in ("prepared", "tokenized"):
        (tmp_path / name).mkdir()
    for split, part in (("train", train), ("test", test)):
        pq.write_table(part, tmp_path / "prepared" / f"{split}.parquet")
        tokenized, _ = tokens.tokenize_split(
            tables.read_prepared(tmp_path / "prepared", split), tokenizer, params.data
        )
        pq.write_table(tokenized, tmp_path / "tokenized" / f"{split}.parquet")
    write_selection(tmp_path, params)
    reference.run(params, base, tmp_path / "tokenized", tmp_path / "reference", tmp_path / "pairs")
    metrics = run_train(params, base, tmp_path / "tokenized", tmp_path / "reference", tmp_path / "run")
    assert metrics["train_steps"] == 20.0
    held_out = heldout_preference(base, tmp_path / "run" / "adapter", tmp_path / "tokenized")
    assert held_out["margin"][1] > held_out["margin"][0], held_out
