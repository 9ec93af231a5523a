"""tokenize stage on tiny data: trl's own ids, the length limits, and that bad input leaves old outputs alone."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpo_pipeline import layout
from dpo_pipeline.data import tables, tokens
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json
from dpo_pipeline.train import dpo as dpo_lib
from stages import tokenize
from tests.conftest import replace_params
from tests.stage.test_prepare import run_into, write_rows

EXPECTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("length", pa.int32()),
    ]
)


def write_drop_ids(folder: Path, ids=()) -> Path:
    """What the decontaminate stage leaves: the training row ids to drop (none unless dropping)."""
    from dpo_pipeline.data.contamination import ids_table

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(ids_table(ids), folder / layout.DROP_FILE)
    return folder


def tokenize_into(tmp: Path, params, base_dir: Path, prepared_dir: Path, drop_ids=()) -> dict:
    return tokenize.run(
        params,
        base_dir=base_dir,
        prepared_dir=prepared_dir,
        tokenized_dir=tmp / "data" / "tokenized",
        metrics_path=tmp / "metrics" / "tokens.json",
        contamination_dir=write_drop_ids(tmp / "contamination", drop_ids),
    )


def snapshot(tmp: Path) -> dict[str, bytes]:
    files = sorted(p for p in (tmp / "data" / "tokenized").rglob("*") if p.is_file())
    files.append(tmp / "metrics" / "tokens.json")
    return {str(p.relative_to(tmp)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_params, raw_rows, tiny_base_dir) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        run_into(tmp, tiny_params, write_rows(tmp / "raw.jsonl", raw_rows), tiny_base_dir)
    return tmp / "data" / "prepared"


@pytest.fixture(scope="module")
def limited_params(tiny_params, prepared_dir, tiny_base_dir):
    """Limits that drop some rows of the sample under each reason (set from the rows' real lengths)."""
    from dpo_pipeline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_base_dir)
    table = tables.read_prepared(prepared_dir, "train")
    everything, _ = tokens.tokenize_split(table, tokenizer, tiny_params.data)
    lengths = tokens.token_lengths(everything)
    prompts = sorted(lengths["prompt"].to_pylist())
    totals = sorted(everything["length"].to_pylist())
    return replace_params(
        tiny_params, data={"max_prompt_length": prompts[-3], "max_length": totals[int(len(totals) * 0.9)]}
    )


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, limited_params, tiny_base_dir, prepared_dir):
    tmp = tmp_path_factory.mktemp("tokenized")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        metrics = tokenize_into(tmp, limited_params, tiny_base_dir, prepared_dir)
    return tmp, metrics


def test_writes_both_splits_with_the_exact_schema_and_metrics(tokenized, prepared_dir, limited_params):
    tmp, metrics = tokenized
    out = tmp / "data" / "tokenized"
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]
    assert sorted(p.name for p in (tmp / "data").iterdir()) == ["tokenized"]  # nothing half-written beside it
    assert read_json(tmp / "metrics" / "tokens.json") == metrics
    data = limited_params.data
    for split in layout.SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.remove_metadata().equals(EXPECTED_SCHEMA), table.schema
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items() if k.startswith(b"dpo.")}
        assert meta["dpo.max_length"] == str(data.max_length) and meta["dpo.split"] == split
        prepared = pq.read_table(prepared_dir / f"{split}.parquet")
        ids = prepared["id"].to_pylist()
        kept = table["id"].to_pylist()
        assert kept == [i for i in ids if i in set(kept)]  # the prepared order, minus dropped rows
        assert metrics[f"rows_{split}"] == len(kept)
        lengths = tokens.token_lengths(table)
        assert max(lengths["prompt"].to_pylist()) <= data.max_prompt_length
        assert max(table["length"].to_pylist()) <= data.max_length
    dropped = metrics["dropped_prompt_too_long"] + metrics["dropped_too_long"]
    assert metrics["dropped_prompt_too_long"] >= 1 and metrics["dropped_too_long"] >= 1
    assert metrics["dropped_contaminated"] == 0
    rows_in = sum(pq.read_metadata(prepared_dir / f"{s}.parquet").num_rows for s in layout.SPLITS)
    assert metrics["rows_train"] + metrics["rows_test"] + dropped == rows_in


def test_ids_equal_trls_own_tokenization(tokenized, prepared_dir, tiny_base_dir, limited_params, tmp_path):
    """The ids train hands to trl are what trl 1.16's DPOTrainer._prepare_dataset makes of the strings."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_pipeline.models.loading import load_tokenizer

    tmp, _ = tokenized
    tokenizer = load_tokenizer(tiny_base_dir)
    args = dpo_lib.dpo_config(limited_params, tmp_path / "ckpt")
    stand_in = types.SimpleNamespace(_tokenizer=tokenizer)  # the one attribute trl's method reads
    for split in layout.SPLITS:
        ours = pq.read_table(tmp / "data" / "tokenized" / f"{split}.parquet")
        texts = tokens.trl_texts(tables.read_prepared(prepared_dir, split), tokenizer.eos_token)
        texts = texts.filter(pa.compute.is_in(texts["id"], value_set=ours["id"]))
        theirs = DPOTrainer._prepare_dataset(stand_in, Dataset(texts), tokenizer, args, split)
        assert list(theirs["id"]) == ours["id"].to_pylist()
        for name in tokens.IDS_COLUMNS:
            assert list(theirs[name]) == ours[name].to_pylist(), name


def test_batched_tokenization_equals_trl_on_the_rows_trl_treats_specially(
    tmp_path, tiny_params, tiny_base_dir
):
    """tokenize_pairs against trl on rows that exercise each of trl's branches."""
    from datasets import Dataset
    from trl import DPOTrainer

    from dpo_pipeline.models.loading import load_tokenizer
    from tests.stage.test_train import chatml_prompt

    tokenizer = load_tokenizer(tiny_base_dir)
    eos = tokenizer.eos_token
    args = dpo_lib.dpo_config(tiny_params, tmp_path / "ckpt")
    # An answer without the eos (trl appends it), a prompt ending inside a word so that prompt+answer
    # tokenizes across the boundary (the answer starts where the token sequences diverge), and a prompt that
    # fills max_length (keep_start truncation drops the row).
    rows = pa.table(
        {
            "id": ["plain", "no-eos", "mid-word", "too-long"],
            "prompt": [
                chatml_prompt("Be brief.", "Capital of France?"),
                chatml_prompt("", "Name a colour."),
                "Tell me about th",
                chatml_prompt("", "word " * args.max_length),
            ],
            "chosen": ["Paris." + eos, "Blue", "e weather" + eos, "fine" + eos],
            "rejected": ["Rome." + eos, "Seven" + eos, "e answer" + eos, "also fine" + eos],
        }
    )
    expected = DPOTrainer._prepare_dataset(
        types.SimpleNamespace(_tokenizer=tokenizer), Dataset(rows), tokenizer, args, "t"
    )
    got = tokens.tokenize_pairs(rows, tokenizer, eos, args.max_length, args.truncation_mode)
    assert Dataset(got).features == expected.features
    assert got.num_rows == expected.num_rows == 3  # the too-long row is dropped
    for name in expected.column_names:
        assert got[name].to_pylist() == list(expected[name]), name
    by_id = {row["id"]: row for row in got.to_pylist()}
    assert by_id["no-eos"]["chosen"] == "Blue" + eos
    mid_word = by_id["mid-word"]
    assert len(mid_word["prompt_ids"]) < len(tokenizer(text=mid_word["prompt"])["input_ids"])  # diverged
    assert (
        tokenizer.decode(mid_word["prompt_ids"] + mid_word["chosen_ids"]) == "Tell me about the weather" + eos
    )


def test_same_input_gives_byte_identical_outputs(
    tokenized, limited_params, tiny_base_dir, prepared_dir, tmp_path
):
    tmp, metrics = tokenized
    assert tokenize_into(tmp_path, limited_params, tiny_base_dir, prepared_dir) == metrics
    assert snapshot(tmp_path) == snapshot(tmp)


def test_bad_input_fails_naming_the_file_and_keeps_previous_outputs(
    tokenized, limited_params, tiny_base_dir, prepared_dir, tmp_path
):
    tmp, _ = tokenized
    tokenize_into(tmp_path, limited_params, tiny_base_dir, prepared_dir)
    before = snapshot(tmp_path)
    missing = tmp_path / "no-prepared"
    with pytest.raises(StageError, match=r"no-prepared/train\.parquet: prepared split not found"):
        tokenize_into(tmp_path, limited_params, tiny_base_dir, missing)
    assert snapshot(tmp_path) == before
    tight = replace_params(limited_params, data={"max_prompt_length": 2, "max_length": 3})
    with pytest.raises(StageError, match=r"train\.parquet: no rows fit the length limits"):
        tokenize_into(tmp_path, tight, tiny_base_dir, prepared_dir)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tokenized"]


def test_cli_exits_non_zero_with_one_line_and_keeps_outputs(
    tokenized, tiny_base_dir, prepared_dir, tmp_path, repo_root
):
    """`python -m stages.tokenize` with the default paths, as dvc runs it, with limits no row fits."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_base_dir, target_is_directory=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(prepared_dir, target_is_directory=True)
    write_drop_ids(tmp_path / "data" / "contamination")
    params = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["max_prompt_length"], params["data"]["max_length"] = 2, 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(repo_root), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    result = subprocess.run(
        [sys.executable, "-m", "stages.tokenize"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data/prepared/train.parquet: no rows fit the length limits"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "tokenized").exists() and not (tmp_path / "metrics").exists()


def test_mlflow_run_records_the_limits_and_lineage(tokenized, limited_params):
    from mlflow.tracking import MlflowClient

    tmp, metrics = tokenized
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(limited_params.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tokenize'")
    assert run.info.status == "FINISHED"
    assert run.data.params == {
        "data.max_prompt_length": str(limited_params.data.max_prompt_length),
        "data.max_length": str(limited_params.data.max_length),
    }
    assert run.data.tags["input.prepared.hash"].startswith("sha256:")
    assert run.data.tags["input.base.hash"].startswith("sha256:")
    assert run.data.tags["output.tokenized.path"]
    assert run.data.metrics["rows_train"] == metrics["rows_train"]


def test_training_rows_the_decontaminate_stage_selected_are_dropped_and_counted(
    tmp_path, tiny_params, tiny_base_dir, prepared_dir
):
    train_ids = pq.read_table(prepared_dir / "train.parquet")["id"].to_pylist()
    test_ids = pq.read_table(prepared_dir / "test.parquet")["id"].to_pylist()
    picked = (
        train_ids[3:6] + test_ids[:1]
    )  # a held-out id is never dropped: evaluation scores the split whole
    metrics = tokenize_into(tmp_path, tiny_params, tiny_base_dir, prepared_dir, picked)
    assert metrics["dropped_contaminated"] == 3
    kept = pq.read_table(tmp_path / "data" / "tokenized" / "train.parquet")["id"].to_pylist()
    assert not set(picked[:3]) & set(kept)
    assert test_ids[0] in pq.read_table(tmp_path / "data" / "tokenized" / "test.parquet")["id"].to_pylist()
