"""Seeded sample generations on a loaded model, and their figures (turns ended, lengths)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.chatml import format_prompt
from dpo_pipeline.evaluate.harness import load_eval_model

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import EvalParams, Params


def generation_meta(params: Params) -> dict[str, Any]:
    e = params.eval
    return {
        "seed": params.seed,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
    }


def generation_kwargs(e: EvalParams, tokenizer) -> dict[str, Any]:
    """Seeded nucleus sampling, exactly as params say (top_k off, so only temperature and top_p shape it)."""
    return {
        "do_sample": True,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "top_k": 0,
        "max_new_tokens": e.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }


def decode_answer(new_tokens: list[int], tokenizer) -> tuple[str, bool]:
    """The generated answer up to (not including) the first eos, and whether the turn ended there."""
    eos = tokenizer.eos_token_id
    ended = eos in new_tokens
    if ended:
        new_tokens = new_tokens[: new_tokens.index(eos)]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), ended


def generate_samples(model_dir: Path, params: Params, loaded: tuple | None = None) -> list[dict[str, Any]]:
    """One seeded sampled answer per eval.sample_prompts entry (torch.manual_seed(seed) before each), from
    `loaded` (model, tokenizer) or the folder."""
    import torch

    e = params.eval
    model, tokenizer = loaded if loaded is not None else load_eval_model(model_dir, e)
    kwargs = generation_kwargs(e, tokenizer)
    samples = []
    for prompt in e.sample_prompts:
        text = format_prompt(prompt.system, prompt.question, tokenizer)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        torch.manual_seed(params.seed)
        with torch.no_grad():
            output = model.generate(**inputs, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        answer, ended = decode_answer(new_tokens, tokenizer)
        length = new_tokens.index(tokenizer.eos_token_id) if ended else len(new_tokens)
        samples.append(
            {
                "system": prompt.system,
                "question": prompt.question,
                "answer": answer,
                "ended_turn": ended,
                "length_tokens": length,
            }
        )
    return samples


def sample_figures(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Flat figures of the sample generations: the share that ended their turn, and their lengths in tokens."""
    from dpo_pipeline.evaluate.stats import length_summary

    if not samples:
        return {}
    out = {"samples/ended_turn": round(sum(s["ended_turn"] for s in samples) / len(samples), 6)}
    for name, value in length_summary([s["length_tokens"] for s in samples]).items():
        out[f"samples/length_{name}_tokens"] = round(value, 6)
    return out
