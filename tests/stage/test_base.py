"""The base stage on tiny data: builtin writes a loadable, deterministic model; hub fails clearly offline."""

from __future__ import annotations

import json
import shutil

import pytest

from dpo_pipeline.data import chatml
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json, template_hash
from dpo_pipeline.models import hub
from dpo_pipeline.models.loading import load_model, load_tokenizer, require_safetensors
from stages import base
from tests.conftest import replace_params

HUB_MODEL = "teknium/OpenHermes-2.5-Mistral-7B"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory, raw_rows):
    path = tmp_path_factory.mktemp("corpus") / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw_rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def builtin_params(tiny_params, tiny_corpus):
    return replace_params(tiny_params, base={"builtin": {"corpus": str(tiny_corpus), "pretrain_steps": 3}})


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for this module (creating a SQLite store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _module_store(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)


@pytest.fixture(scope="module")
def built(tmp_path_factory, builtin_params, tracking_uri):
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        out = tmp_path_factory.mktemp("run1") / "base"
        info = base.run(builtin_params, out)
        run_id = mlflow.last_active_run().info.run_id
    return out, info, run_id


def test_builtin_writes_every_file(built):
    out, info, _ = built
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "pipeline_base.json",
    } <= names
    assert "tokenizer_config.json" in names
    assert not any(n.endswith(".bin") for n in names)
    assert not any(p.name.startswith(".base.tmp") for p in out.parent.iterdir())  # no temp sibling left
    assert read_json(out / "pipeline_base.json") == info


def test_builtin_loads_back_as_chatml_mistral(built, builtin_params):
    import torch

    out, info, _ = built
    tokenizer = load_tokenizer(out)
    model = load_model(out)
    assert type(model).__name__ == "MistralForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.hidden_size == builtin_params.base.builtin.hidden_size
    assert info["source"] == "builtin"
    assert info["name"] == builtin_params.base.name
    assert info["chat_template_hash"] == template_hash(tokenizer.chat_template)
    assert info["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert info["pretrain_steps"] == 3
    # Pre-training did something: the held-out loss went down from the random init's.
    assert info["pretrain_loss_final"] < info["pretrain_loss_initial"]
    ids = tokenizer.apply_chat_template(
        chatml.conversation("", "What is the capital of France?"),
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    logits = model(input_ids=ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_builtin_is_recorded_in_mlflow(built, tracking_uri):
    from mlflow.tracking import MlflowClient

    out, info, run_id = built
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.tags["stage"] == "base"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["pretrain_loss_final"] == pytest.approx(info["pretrain_loss_final"], abs=1e-5)
    assert run.data.metrics["parameter_count"] == info["parameter_count"]
    assert run.data.params["base.builtin.pretrain_steps"] == "3"
    assert "input.corpus.hash" in run.data.tags and "output.base.path" in run.data.tags


def test_builtin_is_deterministic(built, builtin_params, tmp_path):
    out, _, _ = built
    again = tmp_path / "base"
    base.run(builtin_params, again)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert (again / "pipeline_base.json").read_bytes() == (out / "pipeline_base.json").read_bytes()
    # A different seed gives different weights.
    other = tmp_path / "other"
    base.run(replace_params(builtin_params, seed=builtin_params.seed + 1), other)
    assert (other / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()


def test_builtin_bad_corpus_leaves_old_output(builtin_params, tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    (out / "marker").write_text("old")
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"system": "", "question": "q", "chosen": "a", "rejected": "b"}\nnot json\n')
    params = replace_params(builtin_params, base={"builtin": {"corpus": str(corpus)}})
    with pytest.raises(StageError, match=r"bad\.jsonl: line 2: not valid JSON"):
        base.run(params, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".base")] == []
    assert (out / "marker").read_text() == "old"


def _hub_params(params):
    return replace_params(params, base={"source": "hub", "name": HUB_MODEL, "revision": HUB_REVISION})


def test_hub_fails_clearly_offline(builtin_params, tmp_path, monkeypatch):
    import os

    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    out = tmp_path / "base"
    with pytest.raises(StageError) as err:
        base.run(_hub_params(builtin_params), out)
    message = str(err.value)
    assert HUB_MODEL in message and HUB_REVISION in message
    assert "offline" in message and "unreachable" in message
    assert not out.exists()


def _fake_snapshot(tiny_base_dir, tmp_path, drop_template: bool):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_base_dir, snapshot)
    if drop_template:
        (snapshot / "chat_template.jinja").unlink(missing_ok=True)
        config_file = snapshot / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.pop("chat_template", None)
        config_file.write_text(json.dumps(config))
    return snapshot


def test_hub_publishes_snapshot_and_adds_chatml(builtin_params, tiny_base_dir, tmp_path, monkeypatch):
    snapshot = _fake_snapshot(tiny_base_dir, tmp_path, drop_template=True)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(snapshot)).chat_template is None
    calls = []
    monkeypatch.setattr(hub, "download_snapshot", lambda *a: calls.append(a) or snapshot)
    out = tmp_path / "base"
    info = base.run(_hub_params(builtin_params), out)
    assert calls == [(HUB_MODEL, HUB_REVISION, False)]
    assert info["source"] == "hub" and info["revision"] == HUB_REVISION
    assert info["chat_template_added"] is True
    tokenizer = load_tokenizer(out)
    model = load_model(out)
    assert info["chat_template_hash"] == template_hash(tokenizer.chat_template)
    assert info["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert read_json(out / "pipeline_base.json")["name"] == HUB_MODEL


def test_hub_refuses_pickle_only_and_remote_code(builtin_params, tiny_base_dir, tmp_path, monkeypatch):
    snapshot = _fake_snapshot(tiny_base_dir, tmp_path, drop_template=False)
    monkeypatch.setattr(hub, "download_snapshot", lambda *a: snapshot)
    config_file = snapshot / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    config_file.write_text(json.dumps(config))
    out = tmp_path / "base"
    with pytest.raises(StageError, match="trust_remote_code is false"):
        base.run(_hub_params(builtin_params), out)
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    with pytest.raises(StageError, match="pickle"):
        base.run(_hub_params(builtin_params), out)
    assert not out.exists()


def test_require_safetensors_refuses_pytorch_bin_only(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(StageError, match=r"pytorch_model\.bin.*expected \*\.safetensors"):
        require_safetensors(folder)
    (folder / "model.safetensors").write_bytes(b"")
    require_safetensors(folder)
