"""The adapter save of a sharded run (train.distributed fsdp / zero3) on one process: the whole model's state
dict, as accelerate's get_state_dict gathers it under FULL_STATE_DICT / zero3_save_16bit_model, goes through
dpo.save_adapter and gives the very bytes of an unsharded save (peft picks the adapter's weights out of it).
The gathering itself needs accelerators: `make gpu-check` runs FSDP at world size 1 (docs/scaling.md)."""

from __future__ import annotations

import torch

from dpo_pipeline.models import loading
from dpo_pipeline.train import dpo
from tests.conftest import replace_params
from tests.stage.test_train import train_params  # noqa: F401 - fixture


def test_a_whole_state_dict_saves_the_adapter_an_unsharded_save_writes(tmp_path, train_params, tiny_base_dir):  # noqa: F811
    from peft import get_peft_model

    params = replace_params(train_params, train={"device": "cpu"})
    model = get_peft_model(
        loading.load_policy(tiny_base_dir, params.train), loading.lora_config(params.train.lora)
    )
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.linspace(-0.1, 0.1, weight.numel()).reshape(weight.shape))
    tokenizer = loading.load_tokenizer(tiny_base_dir)
    whole = model.state_dict()
    assert any("lora_B" in k for k in whole) and any("lora" not in k for k in whole)

    dpo.save_adapter(model, tokenizer, tmp_path / "plain")
    dpo.save_adapter(model, tokenizer, tmp_path / "gathered", state_dict=whole)
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    gathered = sorted(
        p.relative_to(tmp_path / "gathered") for p in (tmp_path / "gathered").rglob("*") if p.is_file()
    )
    assert plain == gathered and any(p.suffix == ".safetensors" for p in plain)
    for rel in plain:
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "gathered" / rel).read_bytes(), rel
    # ... and the weights come from that state dict, not from the model object's own parameters.
    from safetensors.torch import load_file

    doubled = {k: v * 2 if "lora_B" in k else v for k, v in whole.items()}
    dpo.save_adapter(model, tokenizer, tmp_path / "doubled", state_dict=doubled)
    saved = load_file(tmp_path / "doubled" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b_keys = [k for k in saved if "lora_B" in k]
    assert b_keys and all(torch.equal(saved[k], ours[k] * 2) for k in b_keys)
