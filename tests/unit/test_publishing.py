"""Issue 17, point 3: what the model card's YAML header takes from the pipeline's records."""

from __future__ import annotations

import re
from types import SimpleNamespace

from dpo_pipeline.models import publish


def test_the_license_comes_from_the_bases_own_card(tmp_path):
    assert publish.base_license(tmp_path) is None  # the builtin base has no card
    (tmp_path / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags: [x]\n---\n# OpenHermes\nlicense: mit\n"
    )
    assert publish.base_license(tmp_path) == "apache-2.0"  # the header's, not the body's
    (tmp_path / "README.md").write_text("# no header\nlicense: mit\n")
    assert publish.base_license(tmp_path) is None


def test_the_datasets_are_the_hub_ones_the_data_came_from(tmp_path):
    hub = SimpleNamespace(source="hub", hub_name="Intel/orca_dpo_pairs")
    assert publish.dataset_ids(hub, None) == ["Intel/orca_dpo_pairs"]
    local = SimpleNamespace(source="local", hub_name="Intel/orca_dpo_pairs")
    imported = tmp_path / "orca_rlhf.jsonl.dvc"
    assert publish.dataset_ids(local, imported) == []  # a local file of unknown origin: no claim
    imported.write_text(
        "deps:\n- path: https://huggingface.co/datasets/Intel/orca_dpo_pairs/resolve/main/orca_rlhf.jsonl\n"
    )
    assert publish.dataset_ids(local, imported) == ["Intel/orca_dpo_pairs"]  # `dvc import-url` of a hub file


def test_the_card_header_is_what_the_hub_reads():
    """huggingface_hub's own ModelCard parses the card; its model-index holds eval.json's figures; the card says
    what the model is for, how it was trained with which framework versions, how to load it, and cites DPO."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    info = {
        "base_name": "teknium/OpenHermes-2.5-Mistral-7B",
        "base_source": "hub",
        "datasets": ["Intel/orca_dpo_pairs"],
        "license": "apache-2.0",
        "language": ["en"],
        "git_commit": "abc",
        "artifact_path": "models/adapter",
        "artifact_md5": "d41d8cd98f00b204e9800998ecf8427e.dir",
        "train_params": {"beta": 0.1},
        "scores": {
            "dpo_heldout_pref/acc": 0.776,
            "dpo_heldout_pref/acc_base": 0.57,
            "dpo_heldout_pref/acc_delta_stderr": 0.027,
            "arc_challenge/acc_norm": 0.6633,
            "meta": {"x": 1},
        },
        "versions": {"version.trl": "1.16.0", "version.transformers": "5.17.0"},
    }
    text = publish.card("adapter", "me/neuralhermes", info)
    parsed = ModelCard(text)
    parsed.validate = None  # validation against the hub's server needs the network; the parse is local
    data = parsed.data
    assert data.base_model == "teknium/OpenHermes-2.5-Mistral-7B" and data.base_model_relation == "adapter"
    assert (data.license, data.language, data.datasets) == ("apache-2.0", ["en"], ["Intel/orca_dpo_pairs"])
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "me/neuralhermes"
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got == {("dpo_heldout_pref", "acc"): 0.776, ("arc_challenge", "acc_norm"): 0.6633}
    for section in (
        "## Intended use and limitations",
        "## Training procedure",
        "## How to use",
        "## Citation",
    ):
        assert section in text, section
    assert "| trl | 1.16.0 |" in text and "Rafailov" in text
    assert 'dtype="auto"' in text and "torch_dtype" not in text
    assert "Not evaluated" in text and "AutoPeftModelForCausalLM" in text


def test_a_builtin_base_is_named_as_what_it_is():
    info = {
        "base_name": "tiny-chatml-mistral",
        "base_source": "builtin",
        "parameter_count": 1311872,
        "datasets": [],
        "git_commit": "abc",
        "artifact_path": "models/merged",
        "artifact_md5": "x",
        "train_params": {},
    }
    text = publish.card("merged", "me/demo", info)
    from huggingface_hub import ModelCard

    data = ModelCard(text).data
    assert data.base_model is None and data.license == "other"  # no hub model to point at, no license known
    assert "builtin demo model tiny-chatml-mistral (a 1.3M-parameter" in text
    assert "not meant to make sense" in text and "--license" in text


def test_a_hub_bases_license_is_asked_of_the_hub_and_offline_is_none(monkeypatch):
    import huggingface_hub

    assert publish.hub_license("teknium/OpenHermes-2.5-Mistral-7B", "0" * 40) is None  # offline in tests
    seen = {}

    def model_info(name, revision=None):
        seen.update(name=name, revision=revision)
        return SimpleNamespace(card_data=SimpleNamespace(license="apache-2.0"))

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    assert publish.hub_license("teknium/OpenHermes-2.5-Mistral-7B", "a" * 40) == "apache-2.0"
    assert seen == {"name": "teknium/OpenHermes-2.5-Mistral-7B", "revision": "a" * 40}


def test_a_repo_id_that_could_name_a_path_outside_the_scratch_folder_is_refused():
    """Issue 24: `make publish REPO=../.. DRY_RUN=1` was accepted (the id names the dry run's folder)."""
    import pytest

    from dpo_pipeline.errors import StageError
    from tools.publish import require_repo_id

    for bad in ("../..", "org/..", "./x", "-org/name", "org/name/extra", "name"):
        with pytest.raises(
            StageError, match=rf"REPO: expected a hub repo id like org/name, got {re.escape(repr(bad))}"
        ):
            require_repo_id(bad)
    require_repo_id("org/name-1.2_x")


def test_both_cards_name_the_runs_method_and_its_reference():
    """Issue 25: merge, publish and report work for every method, and the model card names the method."""
    from dpo_pipeline import config
    from dpo_pipeline.models import merge

    assert set(merge.METHOD_NAMES) == set(merge.METHOD_REFERENCE) == set(config.METHODS)
    info = {"base_name": "b", "datasets": [], "git_commit": "c", "artifact_path": "a", "artifact_md5": "m"}
    simpo = publish.card("merged", "me/x", {**info, "train_params": {"method": "simpo", "beta": 2.0}})
    from huggingface_hub import ModelCard

    tags = ModelCard(simpo).data.tags
    assert "simpo" in tags and "dpo" not in tags
    assert "b with a SimPO-trained LoRA adapter" in simpo and "no reference model" in simpo
    rpo = {"method": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    assert "DPO (sigmoid+sft weights 1/0.5) run" in publish.card(
        "adapter", "me/x", {**info, "train_params": rpo}
    )

    kto = merge.model_card(
        {"merge": {"merge.dtype": "float16"}, "train_params": {"train": {"method": "kto"}}}
    )
    assert "+ KTO (merged)" in kto and "tags: [kto, lora, merged]" in kto
    # A train_summary.json from before train.method existed is DPO, and plain sigmoid DPO is just "DPO".
    old = merge.model_card({"merge": {"merge.dtype": "float16"}, "train_params": {"train": {"beta": 0.1}}})
    assert "+ DPO (merged)" in old and "trained with Direct Preference Optimization (" in old
