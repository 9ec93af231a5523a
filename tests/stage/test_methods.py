# ruff: noqa: F811 - the fixtures imported from test_train are parameters here
"""Every train.method on the tiny 4-bit model: it trains, changes the adapter and moves the held-out preference
margin toward the chosen answers; the reference-free methods' reference stage loads no model; the documented DPO
loss lists (RPO, MPO) train. (Held-out accuracy over the 9 test pairs is too coarse to move in 20 steps: the
margin is its continuous form; the small-profile table in docs/methods.md has the accuracies.)"""

from __future__ import annotations

import json
import time

import pytest

from dpo_pipeline.models import loading
from tests.conftest import replace_params
from tests.stage.test_train import (  # noqa: F401 - the fixtures
    load_adapter,
    pairs_of,
    reference_dir,
    run_train,
    tokenized_dir,
    train_params,
)


def heldout_preference(base_dir, adapter_dir, tokenized_dir) -> dict[str, tuple[float, float]]:
    """On the held-out split (data/tokenized/test.parquet): the mean of log p(chosen) - log p(rejected) given
    the prompt (summed over answer tokens) and the share of pairs where it is > 0, for the base (adapter
    disabled) and the trained adapter: {"margin": (base, tuned), "accuracy": (base, tuned)}."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_pipeline.models.merge import token_logprobs

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    rows = pq.read_table(tokenized_dir / "test.parquet").to_pylist()

    def margins() -> list[float]:
        out = []
        for row in rows:
            prompt = row["prompt_ids"]
            total = []
            for answer in (row["chosen_ids"], row["rejected_ids"]):
                logps = token_logprobs(model, torch.tensor(prompt + answer))
                total.append(float(logps[len(prompt) - 1 :].sum()))
            out.append(total[0] - total[1])
        return out

    tuned = margins()
    with model.disable_adapter():
        base = margins()
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    share = lambda xs: sum(x > 0 for x in xs) / len(xs)  # noqa: E731
    return {"margin": (mean(base), mean(tuned)), "accuracy": (share(base), share(tuned)), "n": len(rows)}


@pytest.mark.parametrize("method", ["simpo", "cpo", "orpo"])
def test_a_reference_free_method_s_reference_stage_loads_no_model(
    method, tmp_path, monkeypatch, train_params, tiny_base_dir, tokenized_dir
):
    from stages import reference

    def refuse(*args, **kwargs):
        raise AssertionError("the reference stage loaded a model for a reference-free method")

    monkeypatch.setattr(loading, "load_policy", refuse)
    monkeypatch.setattr(loading, "load_tokenizer", refuse)
    params = replace_params(train_params, train={"method": method})
    out = tmp_path / "reference"
    started = time.perf_counter()
    meta = reference.run(params, tiny_base_dir, tokenized_dir, out, pairs_of(tokenized_dir))
    seconds = time.perf_counter() - started
    assert meta["computed"] is False and meta["rows"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]
    assert json.loads((out / "meta.json").read_text())["params"]["train.method"] == method
    assert seconds < 5.0, f"{seconds:.1f} s for a stage that loads nothing"


@pytest.mark.parametrize(
    "train",
    [
        {"method": "simpo"},
        {"method": "cpo"},
        # ORPO's beta (lambda) at 0.1 makes 20 steps of the tiny model almost pure SFT on the chosen answers,
        # which lifts the rejected (same style) about as much; at 1.0 its odds-ratio term counts.
        {"method": "orpo", "beta": 1.0},
        {"method": "kto"},
        {
            "method": "dpo",
            "loss_type": ["sigmoid", "sft"],
            "loss_weights": [1.0, 1.0],
            "precompute_ref": False,
        },
        {"method": "dpo", "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    ],
    ids=["simpo", "cpo", "orpo", "kto", "rpo", "mpo"],
)
def test_every_method_trains_and_changes_the_adapter(
    train, tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir
):
    """A reference-free method never reads data/reference: it is pointed at a folder that does not exist."""
    import torch

    params = replace_params(
        train_params, train={"max_steps": 20, "warmup_steps": 0, "save_steps": 100, **train}
    )
    missing_reference = tmp_path / "no-reference"
    ref = missing_reference if train["method"] != "dpo" else reference_dir
    metrics = run_train(
        params,
        tiny_base_dir,
        tokenized_dir,
        ref,
        tmp_path,
        prepared_dir=tokenized_dir.parent / "prepared",
    )
    assert metrics["train_steps"] == 20.0
    assert all(value == value for value in metrics.values())  # no NaN
    weights = load_adapter(tmp_path / "adapter")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(torch.count_nonzero(w) for w in lora_b), "LoRA B is still zero: nothing was trained"
    summary = json.loads((tmp_path / "adapter" / "train_summary.json").read_text())
    assert summary["params"]["train"]["method"] == train["method"]
    if train["method"] == "kto":
        assert "rewards_accuracies" not in metrics  # KTO's rows are unpaired: no accuracy is logged
    else:
        assert 0.0 <= metrics["eval_rewards_accuracies"] <= 1.0
    if train["method"] == "orpo":
        assert "eval_log_odds_chosen" in metrics
    # Held out: the adapter moves the preference for the chosen answer (log p(chosen) - log p(rejected)).
    held_out = heldout_preference(tiny_base_dir, tmp_path / "adapter", tokenized_dir)
    assert held_out["margin"][1] > held_out["margin"][0], held_out
