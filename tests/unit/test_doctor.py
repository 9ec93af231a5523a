"""make doctor: facts about this machine, and what a params file asks for that it lacks."""

from __future__ import annotations

import os

import torch

from dpo_pipeline import config
from tests.conftest import REPO
from tools import doctor


def test_facts_name_the_torch_build_and_never_print_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    facts = doctor.facts()
    assert facts["torch"].startswith(torch.__version__)
    assert facts["HF_TOKEN"] == "set"
    assert "hf_secret_value_123" not in repr(facts)
    assert "GiB" in facts["free disk here"]


def test_small_profile_runs_here_and_the_recipe_needs_cuda():
    assert doctor.missing_for(config.load(REPO / "params.yaml")) == []
    recipe = doctor.missing_for(config.load(REPO / "recipes" / "neuralhermes-2.5.yaml"))
    if not torch.cuda.is_available():
        assert any("no CUDA device" in line for line in recipe)
        assert any("paged_adamw_32bit needs CUDA" in line for line in recipe)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        assert any("HF_HUB_OFFLINE=1" in line for line in recipe)
