"""The two model sizes the benchmark trains, and the training data they share.

small  the small profile's model: models/base when it is there (built by `dvc repro base`); otherwise a
       random-init model of the same shape (params `base.builtin`) with the tokenizer trained on the raw
       sample, cached under .scratch/bench/. Throughput and memory do not depend on the weights' values.
large  a Mistral-architecture model with random weights, ~0.6B parameters by default (LARGE), where the
       weights rather than the Python runtime dominate memory. It uses the small model's ChatML tokenizer
       with the embedding and LM head sized for a 32,000-token vocabulary (ids above the tokenizer's are
       simply never used), saved as bf16 safetensors under .scratch/bench/ and rebuilt when its shape
       changes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dpo_pipeline.data import raw
from dpo_pipeline.layout import BASE_DIR, SCRATCH_DIR
from dpo_pipeline.models import builtin

BENCH_SCRATCH = SCRATCH_DIR / "bench"


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32_000

    def parameters(self) -> int:
        """Parameter count of a MistralForCausalLM of this shape (untied embeddings)."""
        head = self.hidden_size // self.num_attention_heads
        attention = (
            2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * head * self.num_key_value_heads
        )
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attention + mlp + 2 * self.hidden_size
        return self.num_hidden_layers * layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


LARGE = Shape(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=10,
    num_attention_heads=16,
    num_key_value_heads=8,
)
LARGE_QUICK = Shape(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4
)


def _complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def small_base(params: Any) -> tuple[Path, str]:
    """(model dir, where it came from) for the small profile's model."""
    if _complete(BASE_DIR):
        return BASE_DIR, "models/base"
    out = BENCH_SCRATCH / "small-base"
    marker = out / "bench_shape.json"
    wanted = json.dumps(dataclasses.asdict(params.base.builtin), sort_keys=True)
    if _complete(out) and marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return out, "random-init (models/base missing)"
    from dpo_pipeline.io import atomic_dir

    rows = raw.read_corpus(params.base.builtin.corpus)
    tokenizer = builtin.build_tokenizer(builtin.tokenizer_texts(rows), params.base.builtin.vocab_size)
    model = builtin.build_model(params.base.builtin, tokenizer, params.seed)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "bench_shape.json").write_text(wanted, encoding="utf-8")
    return out, "random-init (models/base missing)"


def large_model(shape: Shape, tokenizer_dir: Path, seed: int) -> Path:
    """A random-init MistralForCausalLM of `shape` with the ChatML tokenizer of `tokenizer_dir` (cached)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_pipeline.io import atomic_dir
    from dpo_pipeline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    wanted = json.dumps(
        {"shape": dataclasses.asdict(shape), "seed": seed, "vocab": len(tokenizer)}, sort_keys=True
    )
    name = f"large-{shape.hidden_size}x{shape.num_hidden_layers}"
    out = BENCH_SCRATCH / name
    marker = out / "bench_shape.json"
    if _complete(out) and marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return out
    if shape.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {shape.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    config = MistralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker_tmp = tmp / "bench_shape.json"
        marker_tmp.write_text(wanted, encoding="utf-8")
    del model
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.models large|large-quick TOKENIZER_DIR SEED`: build (or find) the large model in a
    process of its own, so the orchestrator never holds its weights; prints the folder."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    shape = {"large": LARGE, "large-quick": LARGE_QUICK}[args[0]]
    print(large_model(shape, Path(args[1]), int(args[2])))


if __name__ == "__main__":
    main()
