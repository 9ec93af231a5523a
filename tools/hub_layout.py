"""An OpenHermes-2.5-Mistral-7B-layout snapshot in a pre-filled Hugging Face cache, for offline tests, the
bench's FLOP count and the GPU check (real tokenizer, any model shape, random weights).

huggingface_hub serves a cached snapshot offline exactly as it would after a download:
`HF_HOME/hub/models--ORG--NAME/{blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>, refs/main}`.
The files are those of the real repo at the recipe's revision, with tiny weights:

- tokenizer.model: the real Mistral-7B sentencepiece model (32,000 pieces), shipped by the `mistral-common`
  wheel as mistral_common/data/tokenizer.model.v1; no tokenizer.json, as on the hub.
- added_tokens.json (`<|im_end|>` = 32000, `<|im_start|>` = 32001), special_tokens_map.json and
  tokenizer_config.json (LlamaTokenizer, add_bos_token, eos `<|im_end|>`, the ChatML chat template).
- config.json of a MistralForCausalLM with vocabulary 32,002 (bf16, bos 1, eos 32000), scaled down, and its
  random weights in two safetensors shards with model.safetensors.index.json.
- pickles the user's cache may hold from another tool (pytorch_model-0000N-of-00002.bin and their index),
  which the base stage must not take into models/base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO_ID = "teknium/OpenHermes-2.5-Mistral-7B"
REVISION = "24c0bea14d53e6f67f1fbe2eca5bfe7cae389b33"  # the recipe's pinned commit
VOCAB_SIZE = 32002
IM_END, IM_START = 32000, 32001
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PICKLES = (
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
)


def mistral_tokenizer_model() -> Path:
    """The real Mistral-7B sentencepiece model shipped inside the mistral-common wheel."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the mistral-common wheel no longer ships the v1 tokenizer model")
    return path


def _token(content: str, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def tokenizer_files() -> dict[str, str]:
    """OpenHermes-2.5's tokenizer files besides tokenizer.model, as JSON text."""
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": _token("<unk>"),
            "1": _token("<s>"),
            "2": _token("</s>"),
            str(IM_END): _token("<|im_end|>"),
            str(IM_START): _token("<|im_start|>"),
        },
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": True,
    }
    return {
        "added_tokens.json": json.dumps({"<|im_end|>": IM_END, "<|im_start|>": IM_START}, indent=2),
        "special_tokens_map.json": json.dumps(
            {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}, indent=2
        ),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


# Mistral-7B's shape (OpenHermes-2.5's): the bench's FLOP count and the GPU check use it.
MISTRAL_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def model_config(**shape: int):
    """OpenHermes-2.5's MistralConfig (vocab 32,002, bos 1, eos 32000, bf16), scaled to `shape`."""
    from transformers import MistralConfig

    dims = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **shape,
    }
    return MistralConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        sliding_window=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=IM_END,
        use_cache=False,
        **dims,
    )


def write_tokenizer(folder: Path) -> Path:
    """OpenHermes-2.5's tokenizer files (the real Mistral sentencepiece model + ChatML tokens) in `folder`,
    with a MistralConfig beside them (transformers picks its conversion by the config's model type)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    model_config().save_pretrained(folder)
    return folder


def _blob(cache_repo: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    blob = cache_repo / "blobs" / digest
    if not blob.exists():
        blob.write_bytes(data)
    return digest


def build_snapshot(hf_home: Path, seed: int = 0, **shape: int) -> Path:
    """Fill `hf_home`/hub with the OpenHermes-layout snapshot; returns the snapshot folder."""
    import torch
    from transformers import MistralForCausalLM

    cache_repo = Path(hf_home) / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = cache_repo / "snapshots" / REVISION
    (cache_repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (cache_repo / "refs").mkdir(exist_ok=True)
    (cache_repo / "refs" / "main").write_text(REVISION)

    files: dict[str, bytes] = {name: text.encode() for name, text in tokenizer_files().items()}
    files["tokenizer.model"] = mistral_tokenizer_model().read_bytes()
    torch.manual_seed(seed)
    model = MistralForCausalLM(model_config(**shape)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        # Two shards, as the hub's 7B (model-00001-of-00002.safetensors + index): the embedding and the
        # the weights.
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=int(size * 0.6))
        for path in sorted(Path(tmp).iterdir()):
            files[path.name] = path.read_bytes()
    shards = sorted(n for n in files if n.startswith("model-") and n.endswith(".safetensors"))
    if len(shards) != 2 or "model.safetensors.index.json" not in files:
        raise AssertionError(f"expected two shards and an index, got {sorted(files)}")
    # What another tool may have left in the same cache: the repo's pickle checkpoint.
    for name in PICKLES:
        files[name] = b"\x80\x02pickle: must never be copied into models/base"
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# OpenHermes 2.5 - Mistral 7B (test layout)\n"

    for name, data in files.items():
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.join("..", "..", "blobs", _blob(cache_repo, data)), link)
    return snapshot
