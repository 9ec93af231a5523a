"""base stage: pin the starting model as a local, versioned artifact.

Reads: params `seed`, `base`; for `base.source: builtin` the raw corpus file `base.builtin.corpus`.
Writes: models/base/ (model.safetensors + config + tokenizer with the ChatML chat template).

Also writes models/base/pipeline_base.json: source, name, revision, chat template hash, parameter count
and the pre-training losses (builtin).

builtin: a small Mistral-architecture causal LM made locally and deterministically: a byte-level BPE
tokenizer trained on the raw text with the ChatML special tokens, random init from the seed, then a short
causal-LM pre-training on the raw text (prompts and both answers, so it has no preference yet).
Pre-training: every row becomes two ChatML conversations (prompt + chosen, prompt + rejected), shuffled by
the seed, concatenated and cut into blocks of `pretrain_max_length` tokens; a few blocks (at most one
batch, about a tenth of the corpus) are held out to measure the loss before and after. Plain torch AdamW
(torch defaults: weight decay 0.01), 5% linear warm-up then cosine decay, gradient norm clipped at 1.0,
deterministic algorithms: the same params and corpus give a byte-identical model.safetensors.
hub: a snapshot of `base.name` at the pinned `base.revision` (safetensors, json, tokenizer files and chat
template; no pickles, no Python unless trust_remote_code). This is the only stage that may talk to the
model hub; every later stage loads models/base/. The token comes only from the environment (HF_TOKEN).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.layout import BASE_DIR
from dpo_pipeline.models.builtin import build_builtin
from dpo_pipeline.models.hub import build_from_hub
from dpo_pipeline.runner import run_main

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params


def run(params: Params, out_dir: str | Path = BASE_DIR) -> dict[str, Any]:
    """Build (builtin) or fetch (hub) the base model into `out_dir`; returns pipeline_base.json's content."""
    from dpo_pipeline import tracking

    out_dir = Path(out_dir)
    builtin = params.base.source == "builtin"
    inputs = {"corpus": Path(params.base.builtin.corpus)} if builtin else {}
    with tracking.stage_run("base", params, sections=["seed", "base"], inputs=inputs):
        info = build_builtin(params, out_dir) if builtin else build_from_hub(params, out_dir)
        tracking.set_tags({"base.chat_template_hash": info["chat_template_hash"]})
        tracking.log_outputs({"base": out_dir})
    print(
        f"base: wrote {out_dir} ({info['source']} {info['name']}, {info['parameter_count']:,} parameters"
        + (
            f", pre-training loss {info['pretrain_loss_initial']:.3f} -> {info['pretrain_loss_final']:.3f})"
            if builtin
            else ")"
        ),
        file=sys.stderr,
    )
    return info


def main() -> None:
    from dpo_pipeline import config

    run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
