"""The base stage on the hub's real OpenHermes-2.5 layout, read offline through huggingface_hub's cache.

No stub of the download: `snapshot_download` itself finds the pinned revision in a pre-filled cache
(tests/hub_cache.py), exactly as on a user's machine after a download.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json
from dpo_pipeline.models.loading import load_model, load_tokenizer
from stages import base
from tests.conftest import replace_params
from tools import hub_layout as hub_cache

# Orca-style text: words, punctuation, digits, newlines, non-ASCII, a leading space, runs of spaces and tabs.
TEXTS = [
    "What is a Large Language Model?",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you can.",
    "Translate to French: The weather is nice today.\nAnswer: Il fait beau aujourd'hui.",
    "Q: 12 + 30 = ?\nA: 42",
    "naïve café, Zürich, 日本語, emoji 🤖.",
    " Hello  world",
    "def f():\n    return 1\n\tpass",
]


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    hub_cache.build_snapshot(home)
    return home


@pytest.fixture
def hub_params(tiny_params):
    return replace_params(
        tiny_params, base={"source": "hub", "name": hub_cache.REPO_ID, "revision": hub_cache.REVISION}
    )


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home


@pytest.fixture
def hub_base(hub_params, offline_cache, tmp_path):
    out = tmp_path / "base"
    info = base.run(hub_params, out)
    return out, info


def test_hub_snapshot_is_taken_through_the_real_cache_path(hub_base, hf_home):
    out, info = hub_base
    names = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" in names  # converted once, here
    assert "tokenizer.model" in names
    assert ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] == [
        n for n in names if n.endswith(".safetensors")
    ]
    assert "model.safetensors.index.json" in names
    for pickle in hub_cache.PICKLES:  # in the cache, never in the versioned artifact
        assert (hf_home / "hub").rglob(pickle)
        assert pickle not in names
    assert not any(n.endswith(".bin") for n in names)
    assert all(not (out / n).is_symlink() for n in names)
    model = load_model(out)
    assert model.config.vocab_size == hub_cache.VOCAB_SIZE
    assert info["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert info["chat_template_added"] is False  # OpenHermes ships ChatML in tokenizer_config.json
    assert read_json(out / "pipeline_base.json")["revision"] == hub_cache.REVISION


def test_ids_match_sentencepiece_and_chatml_tokens_are_single(hub_base):
    import sentencepiece

    out, _ = hub_base
    tokenizer = load_tokenizer(out)
    assert tokenizer.is_fast and len(tokenizer) == hub_cache.VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, hub_cache.IM_END)
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [
        hub_cache.IM_END,
        hub_cache.IM_START,
    ]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hub_cache.mistral_tokenizer_model()))
    assert sp.get_piece_size() == 32000
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [1, *sp.encode(text)], text
    # A ChatML prompt: BOS 1, each marker one token, the text between them as sentencepiece encodes it.
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": TEXTS[1]}, {"role": "user", "content": TEXTS[0]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt)["input_ids"]
    assert ids[:2] == [1, hub_cache.IM_START]
    assert ids.count(hub_cache.IM_START) == 3 and ids.count(hub_cache.IM_END) == 2
    assert ids[2 : 2 + len(sp.encode("system"))] == sp.encode("system")
    assert TEXTS[0] in tokenizer.decode(ids, skip_special_tokens=True)


def test_later_stages_load_the_tokenizer_without_sentencepiece(hub_base):
    out, _ = hub_base
    code = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, local_files_only=True)\n"
        "print(t('<|im_start|>user\\nHi')['input_ids'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])[:2] == [1, hub_cache.IM_START]


def test_missing_shard_fails_clearly(hub_params, hf_home, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    shutil.copytree(hf_home, home, symlinks=True)
    snapshot = (
        home / "hub" / f"models--{hub_cache.REPO_ID.replace('/', '--')}" / "snapshots" / hub_cache.REVISION
    )
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    out = tmp_path / "base"
    with pytest.raises(StageError, match=r"model-00002-of-00002\.safetensors"):
        base.run(hub_params, out)
    assert not out.exists()
