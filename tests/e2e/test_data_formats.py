"""Issue 26 on the tiny project: a mixture of the multi-turn conversational sample and the UltraFeedback-style sample
(data.source: mix) runs the whole pipeline with `dvc repro`: per-source counts in metrics/data.json, every turn of
a multi-turn prompt in the prepared prompt in order, a held-out preference gain, and an edit of one source file
re-runs from prepare, never the base."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_a_mixture_of_multi_turn_chat_and_ultrafeedback_runs_the_whole_pipeline(clone):
    from tests.stage.test_methods import heldout_preference

    project = clone("mixture")
    mix = project.root / "data" / "raw" / "mix"
    mix.mkdir()
    for name in ("conversational.jsonl", "ultrafeedback.parquet"):
        shutil.copy(REPO / "data" / "raw" / "formats" / name, mix / name)
    filters = {
        "drop_ties": True,
        "min_chosen_score": None,
        "min_score_margin": None,
        "drop_flagged": [],
        "swap_disagreeing": False,
    }
    project.set_params(
        {
            "data.source": "mix",
            "data.path": "data/raw/mix",
            "data.sources": [
                {"name": "chat", "path": "data/raw/mix/conversational.jsonl"},
                {
                    "name": "uf",
                    "path": "data/raw/mix/ultrafeedback.parquet",
                    "max_rows": 200,
                    "filters": filters,
                },
            ],
            # whole conversations: room for three earlier exchanges in the tiny model's 512 positions
            "data.max_prompt_length": 448,
            "data.max_length": 512,
            "train.max_steps": 20,
            "train.per_device_train_batch_size": 4,
        }
    )
    project.dvc("repro", timeout=1200)
    assert project.dvc("status").stdout.strip() == "Data and pipelines are up to date."

    data = project.read_json("metrics/data.json")
    chat, uf = data["sources"]["chat"], data["sources"]["uf"]
    assert data["format"] == "mixed" and (chat["format"], uf["format"]) == ("conversational", "ultrafeedback")
    ties = sum(
        r["score_chosen"] == r["score_rejected"]
        for r in pq.read_table(mix / "ultrafeedback.parquet").to_pylist()
    )
    assert chat["rows_in"] == uf["rows_in"] == 400 and uf["dropped_tie"] == ties > 0
    assert uf["rows_out"] == 200 and uf["dropped_not_sampled"] == 400 - ties - 200
    assert chat["rows_out"] + uf["rows_out"] == data["rows_out"]

    prepared = pq.read_table(project.root / "data" / "prepared" / "train.parquet").to_pylist()
    multi = [r for r in prepared if r["source"] == "chat" and len(r["messages"]) >= 5]
    assert multi
    for row in multi:
        position = 0
        for message in row["messages"]:
            position = row["prompt"].index(message["content"], position) + len(message["content"])
        assert row["prompt"].endswith("<|im_start|>assistant\n")
    contamination = project.read_json("metrics/contamination.json")
    assert contamination["report"]["prepare_filters"]["sources"]["uf"]["dropped_tie"] == ties

    # trained on both sources, the adapter prefers the held-out chosen answers more than the base does
    tokens = project.read_json("metrics/tokens.json")
    assert tokens["rows_test"] > 0
    held_out = heldout_preference(
        project.root / "models" / "base",
        project.root / "models" / "adapter",
        project.root / "data" / "tokenized",
    )
    assert held_out["margin"][1] > held_out["margin"][0], held_out

    # one source edited: prepare and what follows re-run, the base does not
    source = mix / "conversational.jsonl"
    source.write_text(source.read_text() + source.read_text().splitlines(keepends=True)[0])
    dry = project.dvc("repro", "--dry").stdout
    assert "Running stage 'prepare'" in dry and "Running stage 'base'" not in dry
