"""merge stage on a tiny base + a random (non-zero) LoRA adapter: fidelity, the gate, the card, atomicity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json, sha256_tree
from dpo_pipeline.models import merge as merge_lib
from dpo_pipeline.models.loading import load_model, load_tokenizer
from stages import merge
from tests.conftest import replace_params

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_prepared(out: Path, raw_rows, tokenizer, n_test: int = 6) -> Path:
    """A tiny data/prepared/: ChatML rows like the prepare stage's, ids deliberately out of order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(i: int, r: dict) -> dict:
        messages = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + [
            {"role": "user", "content": r["question"]}
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {
            "id": f"{(7 * i) % 97:04d}",
            "system": r["system"],
            "question": r["question"],
            "prompt": prompt,
            "chosen": r["chosen"] + "<|im_end|>\n",
            "rejected": r["rejected"] + "<|im_end|>\n",
        }

    out.mkdir(parents=True, exist_ok=True)
    test = pa.Table.from_pylist([row(i, r) for i, r in enumerate(raw_rows[:n_test])])
    train = pa.Table.from_pylist([row(i, r) for i, r in enumerate(raw_rows[n_test : n_test + 8])])
    meta = {b"dpo.raw_source": b"data/raw/tiny.jsonl", b"dpo.raw_data_hash": b"feedc0ffee", b"other": b"x"}
    pq.write_table(test.replace_schema_metadata(meta), out / "test.parquet")
    pq.write_table(train.replace_schema_metadata(meta), out / "train.parquet")
    return out


def make_adapter(base_dir: Path, out: Path, scale: float = 0.05, summary: dict | None = None) -> Path:
    """A PEFT LoRA adapter on the tiny base whose lora_B are random non-zero, so the merge matters."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(out)
    if summary is not None:
        (out / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory, tiny_base_dir, raw_rows):
    root = tmp_path_factory.mktemp("merge_inputs")
    tokenizer = load_tokenizer(tiny_base_dir)
    prepared = write_prepared(root / "prepared", raw_rows, tokenizer)
    summary = {
        "params": {
            "train": {
                "beta": 0.1,
                "learning_rate": 5.0e-4,
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "fp4",
            }
        },
        "metrics": {"rewards_accuracies": 0.8125},
    }
    adapter = make_adapter(tiny_base_dir, root / "adapter", summary=summary)
    return {"base": tiny_base_dir, "adapter": adapter, "prepared": prepared}


def record_train_run(uri: str, experiment: str, adapter_dir: Path) -> str:
    """A finished train run tagged as the train stage tags it (the e2e lineage test checks a real one)."""
    import mlflow

    from dpo_pipeline import tracking

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    tags = {"stage": "train", tracking.ADAPTER_SHA256_TAG: sha256_tree(adapter_dir)}
    with mlflow.start_run(tags=tags) as run:
        return run.info.run_id


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_params, merge_inputs):
    """One merge run (and a second one of the same inputs, for determinism), with its own MLflow store."""
    root = tmp_path_factory.mktemp("merged")
    out = {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", out["uri"])
        out["train_run_id"] = record_train_run(
            out["uri"], tiny_params.tracking.experiment, merge_inputs["adapter"]
        )
        for name in ("first", "second"):
            out[name] = merge.run(
                tiny_params,
                merge_inputs["base"],
                merge_inputs["adapter"],
                merge_inputs["prepared"],
                root / name / "models" / "merged",
                root / name / "metrics" / "merge.json",
            )
    return out


def _token_logps(model, tokenizer, text: str):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return merge_lib.token_logprobs(model, ids)


def test_merge_metrics_show_a_small_fidelity_error_and_a_real_delta(merged, tiny_params):
    written = read_json(merged["root"] / "first" / "metrics" / "merge.json")
    assert written == merged["first"]
    assert set(written) == {
        "fidelity_max_abs_diff",
        "fidelity_mean_abs_diff",
        "fidelity_prompts",
        "fidelity_tokens",
        "adapter_effect_max_abs",
        "adapter_effect_mean_abs",
        "merged_params",
    }
    assert all(isinstance(v, (int, float)) for v in written.values())
    assert written["fidelity_prompts"] == tiny_params.merge.fidelity_prompts == 4
    # non-zero (float16 rounding of W + BA) and within the params' tolerance
    assert 0 < written["fidelity_max_abs_diff"] <= tiny_params.merge.fidelity_max_abs
    assert 0 < written["fidelity_mean_abs_diff"] <= tiny_params.merge.fidelity_mean_abs
    # the adapter moved log-probs far more than the merge's rounding did: the delta was carried over
    assert written["adapter_effect_mean_abs"] > 10 * written["fidelity_mean_abs_diff"]


def test_merged_folder_is_a_float16_model_with_tokenizer_and_lineage(merged, merge_inputs):
    import torch
    from safetensors import safe_open

    merged_dir = merged["root"] / "first" / "models" / "merged"
    names = {p.name for p in merged_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
        "README.md",
        "pipeline_merge.json",
    } <= names
    assert not any(".tmp-" in p.name for p in merged_dir.parent.iterdir())
    with safe_open(merged_dir / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
        assert not any("lora" in k for k in fh.keys())
    assert load_tokenizer(merged_dir).chat_template == load_tokenizer(merge_inputs["base"]).chat_template
    info = read_json(merged_dir / "pipeline_merge.json")
    assert info["adapter_hash"].startswith("sha256:")
    assert info["adapter_sha256"] == sha256_tree(merge_inputs["adapter"])
    # No run id anywhere in the folder: a train re-run that reproduces the adapter leaves it byte-identical.
    for path in merged_dir.iterdir():
        if path.suffix in (".json", ".md"):
            assert merged["train_run_id"] not in path.read_text(encoding="utf-8"), path.name


def test_merged_logprobs_match_the_adapter_on_base_in_float32(merged, merge_inputs, tiny_params):
    """An independent check of the published files: float32 forward of merged vs base + adapter."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel

    merged_dir = merged["root"] / "first" / "models" / "merged"
    tokenizer = load_tokenizer(merged_dir)
    rows = pq.read_table(merge_inputs["prepared"] / "test.parquet").sort_by("id").to_pylist()
    text = rows[-1]["prompt"] + rows[-1]["chosen"]  # a row the stage's own check did not use (4 of 6)
    merged_model = load_model(merged_dir, dtype=torch.float32).eval()
    base_model = load_model(merge_inputs["base"], dtype=torch.float32).eval()
    base_logps = _token_logps(base_model, tokenizer, text)
    adapter_model = PeftModel.from_pretrained(base_model, str(merge_inputs["adapter"])).eval()
    merged_logps = _token_logps(merged_model, tokenizer, text)
    diff = (merged_logps - _token_logps(adapter_model, tokenizer, text)).abs()
    assert diff.max() < tiny_params.merge.fidelity_max_abs
    assert diff.mean() < tiny_params.merge.fidelity_mean_abs
    assert (
        merged_logps - base_logps
    ).abs().mean() > 10 * diff.mean()  # the merged weights are not the base's


def test_model_card_names_base_data_params_and_training(merged, merge_inputs):
    card = (merged["root"] / "first" / "models" / "merged" / "README.md").read_text(encoding="utf-8")
    # the tiny base is the builtin one: the card names no hub base_model (it would point the hub at nothing)
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model" not in card.split("---")[1]
    for expected in (
        "feedc0ffee",  # raw data hash from train.parquet's schema metadata
        "data/raw/tiny.jsonl",
        "| r | 4 |",  # adapter_config.json
        "| train.beta | 0.1 |",  # train_summary.json params
        "| rewards_accuracies | 0.8125 |",  # train_summary.json metrics
        "| merge.dtype | float16 |",
        "| merge.fidelity_prompts | 4 |",
        "metrics/eval.json",
        "QLoRA: 4-bit FP4 base",  # what train_summary.json says, not a fixed "NF4"
        sha256_tree(merge_inputs["adapter"]),  # how to find the train run: by the adapter's content hash
    ):
        assert expected in card, expected
    assert "| other |" not in card  # only the prepare stage's dpo.* keys


def test_merge_is_deterministic(merged):
    first, second = (merged["root"] / name / "models" / "merged" for name in ("first", "second"))
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for path in first.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name


def test_merge_run_is_tracked_with_lineage(merged, merge_inputs):
    import mlflow

    mlflow.set_tracking_uri(merged["uri"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'merge'")
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    run = runs.iloc[0]
    assert run["metrics.fidelity_max_abs_diff"] == pytest.approx(merged["second"]["fidelity_max_abs_diff"])
    assert run["tags.lineage.train_run_id"] == merged["train_run_id"]  # found by the adapter's sha256
    assert run["tags.input.adapter.hash"] == run["tags.lineage.adapter.hash"]
    assert run["params.merge.dtype"] == "float16"


def test_gate_failure_publishes_nothing(tmp_path, tiny_params, merge_inputs):
    merged_dir, metrics_path = tmp_path / "merged", tmp_path / "merge.json"
    merged_dir.mkdir()
    (merged_dir / "previous.txt").write_text("old model")
    metrics_path.write_text('{"old": 1}\n')
    strict = replace_params(tiny_params, merge={"fidelity_max_abs": 1.0e-9})
    with pytest.raises(StageError, match=r"fidelity check failed.*merge\.fidelity_max_abs.*unchanged"):
        merge.run(
            strict,
            merge_inputs["base"],
            merge_inputs["adapter"],
            merge_inputs["prepared"],
            merged_dir,
            metrics_path,
        )
    assert [p.name for p in merged_dir.iterdir()] == ["previous.txt"]
    assert metrics_path.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.json", "merged", "mlflow.db"]


def test_missing_or_bad_adapter_fails_clearly(tmp_path, tiny_params, merge_inputs):
    with pytest.raises(StageError, match="adapter folder not found"):
        merge.run(
            tiny_params, merge_inputs["base"], tmp_path / "nope", merge_inputs["prepared"], tmp_path / "m"
        )
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    with pytest.raises(StageError, match=r"missing adapter_model\.safetensors"):
        merge.run(tiny_params, merge_inputs["base"], bad, merge_inputs["prepared"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_truncated_adapter_is_one_error_naming_the_file(tmp_path, tiny_params, merge_inputs, monkeypatch):
    """Issue 24: a cut adapter_model.safetensors ended merge in a safetensors traceback naming no file."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(merge_inputs["adapter"], adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(StageError, match=rf"^{weights}: cannot be read .*dvc checkout --force {adapter}"):
        merge.run(tiny_params, merge_inputs["base"], adapter, merge_inputs["prepared"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------------------
# pure builders


def test_fidelity_texts_take_the_first_rows_by_id():
    import pyarrow as pa

    table = pa.table({"id": ["b", "a", "c"], "prompt": ["P2", "P1", "P3"], "chosen": ["C2", "C1", "C3"]})
    assert merge_lib.fidelity_texts(table, 2) == ["P1C1", "P2C2"]
    assert merge_lib.fidelity_texts(table, 10) == ["P1C1", "P2C2", "P3C3"]
    with pytest.raises(StageError, match="missing column.*chosen"):
        merge_lib.fidelity_texts(table.drop(["chosen"]), 2, "x/test.parquet")
    with pytest.raises(StageError, match="no rows"):
        merge_lib.fidelity_texts(table.slice(0, 0), 2)


def test_fidelity_stats_and_violations(tiny_params):
    import torch

    stats = merge_lib.fidelity_stats(
        [torch.tensor([0.0, -1.0]), torch.tensor([-2.0])], [torch.tensor([0.0, -1.5]), torch.tensor([-2.1])]
    )
    assert stats["tokens"] == 3
    assert stats["max_abs"] == pytest.approx(0.5)
    assert stats["mean_abs"] == pytest.approx(0.2)
    m = dataclasses.replace(tiny_params.merge, fidelity_max_abs=0.1, fidelity_mean_abs=0.01)
    problems = merge_lib.fidelity_violations(stats, m)
    assert len(problems) == 2 and "fidelity_max_abs" in problems[0] and "fidelity_mean_abs" in problems[1]
    assert merge_lib.fidelity_violations({"max_abs": 0.05, "mean_abs": 0.001}, m) == []
    assert merge_lib.fidelity_violations({"max_abs": float("nan"), "mean_abs": 0.0}, m)  # NaN never passes


def test_model_card_without_optional_inputs_is_still_complete():
    card = merge_lib.model_card({"merge": {"merge.dtype": "float16"}})
    assert "unknown base model" in card and "_not recorded_" in card and "## Scores" in card
