"""The whole graph on the hub's real OpenHermes-2.5 layout, read offline from a pre-filled HF cache.

`base.source: hub` at the recipe's pinned revision: the base stage's `snapshot_download` finds the snapshot in
HF_HOME's cache (tests/hub_cache.py: the real Mistral sentencepiece tokenizer + ChatML tokens, tiny random
weights with vocabulary 32,002 in two shards, and pickles that must stay out of models/base), and every later
stage runs on what it published: tokenize, reference, train (QLoRA 4-bit), merge, evaluate.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tools import hub_layout as hub_cache

pytestmark = pytest.mark.slow


def test_whole_graph_runs_on_the_openhermes_layout(clone, tmp_path):
    hf_home = tmp_path / "hf_home"
    snapshot = hub_cache.build_snapshot(hf_home)
    project = clone("hub", cache=False, checkout=False)
    project.env["HF_HOME"] = str(hf_home)
    project.set_params(
        {
            "base.source": "hub",
            "base.name": hub_cache.REPO_ID,
            "base.revision": hub_cache.REVISION,
            "base.builtin.corpus": "data/raw/no_corpus.txt",  # as the recipe sets it
        }
    )
    project.dvc("repro", timeout=900)
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."
    # A data edit re-runs prepare and what follows, never the hub base (for the recipe, a 14.5 GB copy).
    raw = project.root / project.params()["data"]["path"]
    raw.write_text(raw.read_text() + raw.read_text().splitlines(keepends=True)[0])
    dry = project.dvc("repro", "--dry").stdout
    assert "Running stage 'prepare'" in dry and "Running stage 'base'" not in dry
    raw.write_text("".join(raw.read_text().splitlines(keepends=True)[:-1]))  # back as it was

    base = project.root / "models" / "base"
    names = sorted(p.name for p in base.iterdir())
    assert "tokenizer.json" in names and "model.safetensors.index.json" in names
    assert not set(hub_cache.PICKLES) & set(names)
    assert (snapshot / hub_cache.PICKLES[0]).exists()  # it was there to be taken, and was not

    tokenized = pq.read_table(project.root / "data" / "tokenized" / "train.parquet")
    prompt_ids = tokenized.column("prompt_ids").to_pylist()
    assert prompt_ids and all(ids[:2] == [1, hub_cache.IM_START] for ids in prompt_ids)  # BOS, <|im_start|>
    assert all(ids[-3:-1] == [hub_cache.IM_START, 13892] for ids in prompt_ids)  # "<|im_start|>assistant"

    adapter_config = json.loads((project.root / "models" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merged_config = json.loads((project.root / "models" / "merged" / "config.json").read_text())
    assert merged_config["vocab_size"] == hub_cache.VOCAB_SIZE
    assert (project.root / "models" / "merged" / "tokenizer.json").is_file()
    scores = project.read_json("metrics/eval.json")
    assert "dpo_heldout_pref/acc_norm_delta" in scores
