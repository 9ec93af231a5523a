"""Trust: a hub token from the environment never reaches params, MLflow, logs or outputs; the team
tracking server binds to loopback by default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpo_pipeline.errors import StageError
from stages import base, prepare
from tests.conftest import REPO, replace_params

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


def test_hub_token_never_written_anywhere(tmp_path, monkeypatch, capfd, raw_rows, tiny_params):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"  # conftest's per-test store lives here
    corpus = tmp_path / "raw.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in raw_rows[:120]), encoding="utf-8")
    params = replace_params(
        tiny_params,
        base={"builtin": {"corpus": str(corpus), "pretrain_steps": 2}},
        data={"path": str(corpus)},
    )

    base.run(params, tmp_path / "models" / "base")
    prepare.run(
        params,
        raw_path=corpus,
        base_dir=tmp_path / "models" / "base",
        prepared_dir=tmp_path / "data" / "prepared",
        metrics_path=tmp_path / "metrics" / "data.json",
    )
    # The hub path (offline in tests) fails: its message must not carry the token either.
    hub = replace_params(
        params,
        base={"source": "hub", "name": "teknium/OpenHermes-2.5-Mistral-7B", "revision": "0" * 40},
    )
    with pytest.raises(StageError) as failure:
        base.run(hub, tmp_path / "models" / "hub")
    assert FAKE_TOKEN not in str(failure.value)

    logs = capfd.readouterr()
    assert FAKE_TOKEN not in logs.out and FAKE_TOKEN not in logs.err

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("stage") for r in runs} >= {"base", "prepare"}
    for run in runs:
        everything = json.dumps([run.data.params, run.data.tags, run.data.metrics])
        assert FAKE_TOKEN not in everything
    assert mlflow.active_run() is None
    # the raw store, its artifacts and every output on disk
    assert _files_containing(tmp_path, FAKE_TOKEN.encode()) == []


def test_mlflow_server_target_binds_to_loopback():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("mlflow-server:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"mlflow server --host 127\.0\.0\.1 ", recipe), recipe
