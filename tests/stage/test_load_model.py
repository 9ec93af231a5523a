"""loading.load_model reads safetensors with pread (not a memory map) and loads exactly the same tensors."""

from __future__ import annotations

import pytest
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


# Issue 24: damaged model files ended in tracebacks that did not name the file (reference, merge, chat).
@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("model.safetensors", "half"),
        ("model.safetensors", "empty"),
        ("config.json", "half"),
        ("config.json", "gone"),
    ],
)
def test_a_damaged_model_file_is_one_error_naming_it_and_the_repair(tiny_base_dir, tmp_path, name, cut):
    import shutil

    from dpo_pipeline.errors import StageError

    model = tmp_path / "base"
    shutil.copytree(tiny_base_dir, model)
    path = model / name
    if cut == "gone":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    with pytest.raises(StageError) as info:
        loading.load_model(model)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert f"dvc checkout --force {model}" in message and "make verify" in message


def test_a_damaged_tokenizer_file_is_named(tiny_base_dir, tmp_path):
    import shutil

    from dpo_pipeline.errors import StageError
    from dpo_pipeline.models.loading import load_tokenizer

    model = tmp_path / "base"
    shutil.copytree(tiny_base_dir, model)
    (model / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(StageError, match=rf"^{model}/tokenizer\.json: cannot be read \(JSONDecodeError"):
        load_tokenizer(model)
