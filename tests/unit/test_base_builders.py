"""Pure builders of the base stage: tokenizer, chat template, model config, corpus reading and packing."""

from __future__ import annotations

import json

import pytest

from dpo_pipeline.data import chatml, raw
from dpo_pipeline.data.chatml import CHATML_TEMPLATE
from dpo_pipeline.errors import StageError
from dpo_pipeline.models import builtin, hub


@pytest.fixture(scope="module")
def tokenizer(raw_rows):
    return builtin.build_tokenizer(builtin.tokenizer_texts(raw_rows), 400)


def test_special_tokens_are_single_tokens(tokenizer):
    for token in ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>", "<unk>"]:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tokenizer.convert_ids_to_tokens(ids) == [token]
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_eos_is_im_end_and_no_automatic_bos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode(
        "hello", add_special_tokens=False
    )


def test_chat_template_renders_chatml_exactly(tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = chatml.conversation("You are helpful.", "What is 2+2?")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # An empty system prompt gives no system turn.
    no_system = tokenizer.apply_chat_template(chatml.conversation("", "Hi", "Hello."), tokenize=False)
    assert no_system == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def test_tokenizer_roundtrips_text_and_is_deterministic(raw_rows, tokenizer):
    text = raw_rows[3]["question"] + " " + raw_rows[3]["chosen"]
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    again = builtin.build_tokenizer(builtin.tokenizer_texts(raw_rows), 400)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) == 400


def test_model_shape_and_seed(tiny_params, tokenizer):
    import torch

    b = tiny_params.base.builtin
    model = builtin.build_model(b, tokenizer, seed=1)
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == b.hidden_size
    assert model.config.num_hidden_layers == b.num_hidden_layers
    assert model.config.num_key_value_heads == b.num_key_value_heads
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    same = builtin.build_model(b, tokenizer, seed=1)
    other = builtin.build_model(b, tokenizer, seed=2)
    weight = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[weight], same.state_dict()[weight])
    assert not torch.equal(model.state_dict()[weight], other.state_dict()[weight])
    assert builtin.parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


def test_pretrain_documents_hold_both_answers(raw_rows, tokenizer):
    docs = builtin.pretrain_documents(raw_rows[:10], tokenizer)
    answers = [a for r in raw_rows[:10] for a in (r["chosen"], r["rejected"]) if a.strip()]
    assert len(docs) == len(answers)
    for doc, answer in zip(docs, answers, strict=True):
        assert doc.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def test_pack_blocks_is_seeded(raw_rows, tokenizer):
    import torch

    docs = builtin.pretrain_documents(raw_rows, tokenizer)
    blocks = builtin.pack_blocks(docs, tokenizer, 32, seed=3)
    assert blocks.dim() == 2 and blocks.shape[1] == 32 and blocks.dtype == torch.long
    assert torch.equal(blocks, builtin.pack_blocks(docs, tokenizer, 32, seed=3))
    assert not torch.equal(blocks, builtin.pack_blocks(docs, tokenizer, 32, seed=4))
    train, heldout = builtin.split_blocks(blocks, 4)
    assert len(heldout) == 4 and len(train) + len(heldout) == len(blocks)
    with pytest.raises(StageError, match="pretrain_max_length"):
        builtin.pack_blocks(docs[:1], tokenizer, 100_000, seed=3)


def test_read_corpus_is_the_raw_readers_verdict_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"system": "s", "question": "q2", "chatgpt": "c", "llama2-13b-chat": "d"}) + "\n"
    )
    assert raw.read_corpus(good) == [
        {"system": "s", "question": "q2", "chosen": "c", "rejected": "d", "history": "[]", "source": "good"}
    ]

    bad = tmp_path / "bad.jsonl"
    # rows of both schemas in one file: refused as the raw reader refuses it (which answers would be meant?)
    bad.write_text(
        json.dumps({"system": "", "question": "q", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"system": "s", "question": "q2", "chatgpt": "c", "llama2-13b-chat": "d"})
        + "\n"
    )
    with pytest.raises(StageError, match=r"bad\.jsonl: columns of both orca schemas are present"):
        raw.read_corpus(bad)
    bad.write_text(json.dumps({"system": "", "question": "q", "chosen": "a", "rejected": "b"}) + "\n{oops\n")
    with pytest.raises(StageError, match=r"bad\.jsonl: line 2: not valid JSON"):
        raw.read_corpus(bad)
    bad.write_text(json.dumps({"system": "", "question": 3, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(StageError, match=r"bad\.jsonl: line 1: column 'question': expected a string"):
        raw.read_corpus(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(StageError, match=r"bad\.jsonl: unknown raw schema: found columns: answer, question"):
        raw.read_corpus(bad)
    bad.write_text("\n")
    with pytest.raises(StageError, match="empty"):
        raw.read_corpus(bad)
    with pytest.raises(StageError, match="corpus file not found"):
        raw.read_corpus(tmp_path / "missing.jsonl")


def test_hub_patterns_never_fetch_pickles_or_unapproved_code():
    allow, ignore = hub.hub_patterns(trust_remote_code=False)
    assert "*.safetensors" in allow and "*.json" in allow
    assert not any(p.endswith((".bin", ".py")) for p in allow)
    assert "*.bin" in ignore and "pytorch_model*" in ignore
    allow_code, _ = hub.hub_patterns(trust_remote_code=True)
    assert "*.py" in allow_code
