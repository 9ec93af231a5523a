"""prepare stage on tiny data: what it writes, what it counts, and that bad input leaves old outputs alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpo_pipeline.data import chatml, filters
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json, sha256_file, template_hash
from stages import prepare
from tests.conftest import replace_params

EXPECTED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("system", pa.string()),
        ("question", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
    ]
)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_into(tmp: Path, params, raw: Path, base_dir: Path) -> dict:
    return prepare.run(
        params,
        raw_path=raw,
        base_dir=base_dir,
        prepared_dir=tmp / "data" / "prepared",
        metrics_path=tmp / "metrics" / "data.json",
    )


def snapshot(tmp: Path) -> dict[str, bytes]:
    files = sorted(p for p in (tmp / "data").rglob("*") if p.is_file()) + [tmp / "metrics" / "data.json"]
    return {str(p.relative_to(tmp)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _shared_mlflow_store(_isolated_mlflow, mlflow_uri, monkeypatch):
    """One tracking store for this module: creating a fresh SQLite store costs seconds per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mlflow_uri, tiny_params, raw_rows, tiny_base_dir):
    """One run of the stage on the raw sample fixture, shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("prepared")
    raw = write_rows(tmp / "raw.jsonl", raw_rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        metrics = run_into(tmp, tiny_params, raw, tiny_base_dir)
    return tmp, raw, metrics


def test_writes_both_splits_with_the_exact_schema(prepared):
    tmp, _, _ = prepared
    out = tmp / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet"]
    for name in ("train", "test"):
        table = pq.read_table(out / f"{name}.parquet")
        assert table.schema.remove_metadata().equals(EXPECTED_SCHEMA), table.schema
        assert pq.ParquetFile(out / f"{name}.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    # Nothing half-written is left beside the outputs.
    assert sorted(p.name for p in (tmp / "data").iterdir()) == ["prepared"]
    assert sorted(p.name for p in (tmp / "metrics").iterdir()) == ["data.json"]


def test_counts_add_up_and_quirks_are_dropped(prepared, raw_rows):
    from tools.make_raw_sample import quirk_counts

    tmp, _, metrics = prepared
    assert read_json(tmp / "metrics" / "data.json") == metrics
    train = pq.read_table(tmp / "data" / "prepared" / "train.parquet")
    test = pq.read_table(tmp / "data" / "prepared" / "test.parquet")
    assert metrics["rows_in"] == len(raw_rows)
    assert (metrics["rows_train"], metrics["rows_test"]) == (train.num_rows, test.num_rows)
    assert metrics["rows_out"] == train.num_rows + test.num_rows
    drops = {reason: metrics[f"dropped_{reason}"] for reason in filters.REASONS}
    assert metrics["rows_in"] == metrics["rows_out"] + sum(drops.values())
    quirks = quirk_counts(len(raw_rows))
    assert drops["duplicate"] == quirks["duplicate"] >= 1
    assert drops["identical_answers"] == quirks["chosen_equals_rejected"] >= 1
    assert drops["blank_answer"] == quirks["blank_answer"] >= 1
    assert 0 < test.num_rows < train.num_rows


def test_rows_are_formatted_and_ided(prepared, tiny_params, tiny_base_dir):
    from dpo_pipeline.models.loading import load_tokenizer

    tmp, _, _ = prepared
    tokenizer = load_tokenizer(tiny_base_dir)
    table = pa.concat_tables(
        [pq.read_table(tmp / "data" / "prepared" / f"{n}.parquet") for n in ("train", "test")]
    )
    ids = table["id"].to_pylist()
    assert len(set(ids)) == len(ids) and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    for row in table.slice(0, 20).to_pylist():
        raw = {
            "system": row["system"],
            "question": row["question"],
            "chosen": row["chosen"].removesuffix(chatml.ANSWER_SUFFIX),
            "rejected": row["rejected"].removesuffix(chatml.ANSWER_SUFFIX),
        }
        assert chatml.format_row(raw, tokenizer) == {k: row[k] for k in ("prompt", "chosen", "rejected")}
        assert row["id"] == filters.row_id(filters.row_digest(*raw.values()))


def test_parquet_metadata_records_raw_hash_template_and_counts(prepared, tiny_base_dir):
    from dpo_pipeline.models.loading import load_tokenizer

    tmp, raw, metrics = prepared
    for name in ("train", "test"):
        meta = pq.read_schema(tmp / "data" / "prepared" / f"{name}.parquet").metadata
        meta = {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"dpo.")}
        assert meta["dpo.raw_data_hash"] == sha256_file(raw)
        assert meta["dpo.chat_template_hash"] == template_hash(load_tokenizer(tiny_base_dir).chat_template)
        assert meta["dpo.raw_format"] == "orca"
        assert json.loads(meta["dpo.sources"])["raw"]["rows_out"] == metrics["rows_out"]
        assert json.loads(meta["dpo.dropped"]) == {
            k: v for k, v in metrics.items() if k.startswith("dropped_")
        }
        assert meta["dpo.split"] == name
        for key in ("rows_in", "rows_out", "rows_train", "rows_test"):
            assert int(meta[f"dpo.{key}"]) == metrics[key]


def test_same_input_gives_byte_identical_outputs(prepared, tiny_params, tiny_base_dir, tmp_path):
    tmp, raw, _ = prepared
    run_into(tmp_path, tiny_params, raw, tiny_base_dir)
    assert snapshot(tmp_path) == snapshot(tmp)


def test_original_schema_twin_gives_the_same_output(prepared, tiny_params, raw_rows, tiny_base_dir, tmp_path):
    tmp, _, metrics = prepared
    twin = [
        {
            "system": r["system"],
            "question": r["question"],
            "chatgpt": r["chosen"],
            "llama2-13b-chat": r["rejected"],
        }
        for r in raw_rows
    ]
    raw = write_rows(tmp_path / "raw.jsonl", twin)  # the same name: the rows' `source` is the file's stem
    twin_metrics = run_into(tmp_path, tiny_params, raw, tiny_base_dir)
    assert (
        twin_metrics.pop("format") == "orca_original"
        and twin_metrics["sources"]["raw"].pop("format") == "orca_original"
    )
    expected = json.loads(json.dumps(metrics))
    del expected["format"], expected["sources"]["raw"]["format"]
    assert twin_metrics == expected
    for name in ("train", "test"):
        ours = pq.read_table(tmp_path / "data" / "prepared" / f"{name}.parquet")
        theirs = pq.read_table(tmp / "data" / "prepared" / f"{name}.parquet")
        assert ours.equals(theirs)  # data only; the metadata names the schema and the file
        assert ours.schema.metadata[b"dpo.raw_format"] == b"orca_original"


def bad_files(tmp: Path, raw_rows: list[dict]) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error must contain)."""
    good = [json.dumps(r) for r in raw_rows[:20]]
    null = dict(raw_rows[5], chosen=None)
    missing = {k: v for k, v in raw_rows[6].items() if k != "question"}
    cases = {
        "null": (good[:7] + [json.dumps(null)] + good[7:], "line 8: column 'chosen' is null"),
        "missing": (good[:2] + [json.dumps(missing)] + good[2:], "line 3: column 'question' is missing"),
        "unparseable": (good[:10] + ['{"system": "x", '] + good[10:], "line 11: not valid JSON"),
        "not_string": (
            good[:1] + [json.dumps(dict(raw_rows[1], rejected=3))] + good[1:],
            "line 2: column 'rejected'",
        ),
        "empty": ([], "no rows (empty input)"),
    }
    out = {}
    for name, (lines, expected) in cases.items():
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        out[name] = (path, f"{path}: " + expected if name != "empty" else expected)
    wrong = tmp / "raw.csv"
    wrong.write_text("system,question,chosen,rejected\n", encoding="utf-8")
    out["wrong_type"] = (wrong, f"{wrong}: unsupported file type '.csv'")
    return out


def test_bad_input_fails_and_leaves_previous_outputs_byte_identical(
    prepared, tiny_params, raw_rows, tiny_base_dir, tmp_path
):
    tmp, raw, _ = prepared
    run_into(tmp_path, tiny_params, raw, tiny_base_dir)
    before = snapshot(tmp_path)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name, (path, expected) in bad_files(bad_dir, raw_rows).items():
        with pytest.raises(StageError) as info:
            run_into(tmp_path, tiny_params, path, tiny_base_dir)
        assert expected in str(info.value), name
        assert snapshot(tmp_path) == before, name
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"], name


def test_cli_exits_non_zero_with_one_line_and_keeps_outputs(
    prepared, tiny_params, raw_rows, tiny_base_dir, tmp_path, repo_root
):
    """`python -m stages.prepare` with the default paths, as dvc runs it, on a file with a null answer."""
    tmp, raw, _ = prepared
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_base_dir, target_is_directory=True)
    run_into(tmp_path, tiny_params, raw, tiny_base_dir)
    before = snapshot(tmp_path)
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, raw_rows[:3] + [dict(raw_rows[3], question=None)])
    params = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["path"] = "bad.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    result = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: bad.jsonl: line 4: column 'question' is null where text is required"
    )
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_hub_source_offline_fails_naming_dataset_and_revision(
    tiny_params, tiny_base_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache (if datasets is not imported yet)
    revision = "0123456789abcdef0123456789abcdef01234567"  # no cache holds this revision
    params = replace_params(
        tiny_params, data={"source": "hub", "hub_name": "Intel/orca_dpo_pairs", "hub_revision": revision}
    )
    with pytest.raises(StageError) as info:
        prepare.run(
            params,
            base_dir=tiny_base_dir,
            prepared_dir=tmp_path / "data" / "prepared",
            metrics_path=tmp_path / "metrics" / "data.json",
        )
    message = str(info.value)
    assert f"dataset Intel/orca_dpo_pairs at revision {revision}" in message
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()
