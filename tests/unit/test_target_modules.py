"""Issue 15: train.lora.target_modules is checked against the model's real module names before any weights
load: in validate from the config alone (known families), in train from the meta-device model otherwise."""

from __future__ import annotations

import json

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.models import loading

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


@pytest.mark.parametrize("family", sorted(loading.KNOWN_MODULE_LAYOUTS))
def test_the_known_layouts_are_the_models_transformers_builds(tmp_path, family):
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **TINY)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert loading.known_module_kinds(saved) == loading.meta_module_kinds(tmp_path)


def test_an_unknown_family_is_read_from_the_meta_model(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128).save_pretrained(tmp_path)
    assert loading.known_module_kinds(json.loads((tmp_path / "config.json").read_text())) is None
    kinds = loading.base_module_kinds(tmp_path)
    assert "transformer.h.1.attn.c_attn" in kinds  # gpt2 names its layers differently
    with pytest.raises(StageError, match=r"'q_proj' names no module of the model"):
        loading.check_target_modules(["q_proj"], kinds, "params.yaml")


MISTRAL = loading.known_module_kinds({"model_type": "mistral", "num_hidden_layers": 4})


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            ["q_proj", "k_prj"],
            r"params\.yaml: train\.lora\.target_modules: 'k_prj' names no module of the model; "
            r"expected names of its linear layers \(down_proj, embed_tokens, gate_proj, k_proj, lm_head",
        ),
        (["mlp"], r"'mlp' names model\.layers\.0\.mlp, which is not a layer LoRA can adapt"),
        (
            ["input_layernorm"],
            r"'input_layernorm' names model\.layers\.0\.input_layernorm, which is not a layer",
        ),
    ],
)
def test_a_target_that_is_not_a_linear_layer_of_the_model_is_named(targets, message):
    with pytest.raises(StageError, match=message):
        loading.check_target_modules(targets, MISTRAL, "params.yaml")


def test_names_peft_accepts_pass():
    for targets in (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["self_attn.q_proj", "model.layers.3.mlp.down_proj", "lm_head", "embed_tokens"],
    ):
        loading.check_target_modules(targets, MISTRAL, "params.yaml")


def test_the_check_agrees_with_peft_on_a_real_model():
    """What passes the check, peft wraps; the misspelt entry the check refuses, peft silently skips."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", **TINY))
    kinds = loading.module_kinds(model)
    assert kinds == loading.known_module_kinds({"model_type": "mistral", "num_hidden_layers": 2})
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_prj"], task_type="CAUSAL_LM"))
    wrapped = {
        n
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)
    }
    assert wrapped and all(n.endswith("q_proj") for n in wrapped)  # k_prj: nothing, and no error from peft
    with pytest.raises(StageError, match="'k_prj' names no module"):
        loading.check_target_modules(["q_proj", "k_prj"], kinds, "params.yaml")
