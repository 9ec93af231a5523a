# ruff: noqa: F811 - the fixtures imported from test_train are parameters here
"""Every train.method on the tiny 4-bit model: it trains and changes the adapter; the reference-free methods'
reference stage loads no model; a DPO loss list (RPO) trains."""

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
        {"method": "orpo"},
        {"method": "kto"},
        {
            "method": "dpo",
            "loss_type": ["sigmoid", "sft"],
            "loss_weights": [1.0, 1.0],
            "precompute_ref": False,
        },
    ],
    ids=["simpo", "cpo", "orpo", "kto", "rpo"],
)
def test_every_method_trains_and_changes_the_adapter(
    train, tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir
):
    """A reference-free method never reads data/reference: it is pointed at a folder that does not exist."""
    import torch

    params = replace_params(
        train_params, train={"max_steps": 3, "warmup_steps": 0, "save_steps": 100, **train}
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
    assert metrics["train_steps"] == 3.0
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
