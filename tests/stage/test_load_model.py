"""loading.load_model reads safetensors with pread (not a memory map) and loads exactly the same tensors."""

from __future__ import annotations

import torch
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from dpo_pipeline.models import loading


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_model_reads_with_pread_and_restores_transformers(tiny_base_dir, monkeypatch):
    original = modeling_utils.safe_open
    backends = []

    def spy(filename, framework="pt", device="cpu", backend="mmap"):
        backends.append(backend)
        return original(filename, framework=framework, device=device, backend=backend)

    monkeypatch.setattr(modeling_utils, "safe_open", spy)
    loading.load_model(tiny_base_dir)
    assert backends and set(backends) == {"pread"}
    assert modeling_utils.safe_open is spy  # put back after the load

    backends.clear()
    AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), local_files_only=True)
    assert set(backends) == {"mmap"}, "outside load_model transformers' own choice applies"


def test_pread_and_mmap_loads_are_bit_identical_also_in_4bit(tiny_base_dir):
    for kwargs in (
        {},
        {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32,
                bnb_4bit_use_double_quant=True,
            )
        },
    ):
        read = _state(loading.load_model(tiny_base_dir, **kwargs))
        mapped = _state(
            AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), local_files_only=True, **kwargs)
        )
        assert read.keys() == mapped.keys()
        for name, tensor in read.items():
            assert torch.equal(tensor, mapped[name]), name
