"""Shared fixtures: offline environment, a tiny params profile, tiny raw rows and a tiny base model.

Everything is built in the test session under temp dirs; nothing touches the hub or the repo's outputs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import pytest

from dpo_pipeline.models import builtin

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# No network in tests except loopback; set before any HF library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["TQDM_DISABLE"] = "1"
os.environ["DISABLE_MLFLOW_INTEGRATION"] = os.environ.get("DISABLE_MLFLOW_INTEGRATION", "FALSE")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_AUTHOR_NAME", "test")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
os.environ.setdefault("GIT_COMMITTER_NAME", "test")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite store: creating one runs MLflow's migrations (seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch, mlflow_template):
    """Each test gets its own SQLite tracking store (copied from the template, not migrated again)."""
    store = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_params():
    from dpo_pipeline import config

    return config.load(REPO / "params.yaml")


def replace_params(params, **sections):
    """dataclasses.replace on nested sections: replace_params(p, train={"max_steps": 2}, seed=1)."""
    changes = {}
    for name, value in sections.items():
        if isinstance(value, dict):
            current = getattr(params, name)
            inner = {}
            for key, sub in value.items():
                attr = getattr(current, key)
                inner[key] = dataclasses.replace(attr, **sub) if isinstance(sub, dict) else sub
            changes[name] = dataclasses.replace(current, **inner)
        else:
            changes[name] = value
    return dataclasses.replace(params, **changes)


@pytest.fixture(scope="session")
def tiny_params(default_params):
    """The default profile scaled down so each stage runs in seconds."""
    return replace_params(
        default_params,
        base={
            "builtin": {
                "vocab_size": 400,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "pretrain_steps": 5,
                "pretrain_batch_size": 4,
                "pretrain_max_length": 64,
            }
        },
        data={"max_prompt_length": 192, "max_length": 320},
        train={
            "max_steps": 4,
            "warmup_steps": 1,
            "per_device_train_batch_size": 4,
            "save_steps": 2,
            "logging_steps": 1,
            # held-out metrics at the end only: the stage tests build trainers without an eval split too
            "eval_steps": 0,
        },
        merge={"fidelity_prompts": 4},
        eval={"limit": 8, "batch_size": 4, "max_new_tokens": 8},
    )


@pytest.fixture(scope="session")
def raw_rows():
    """A small deterministic raw sample in the current orca_dpo_pairs columns."""
    from tools.make_raw_sample import generate_rows

    return generate_rows(200, seed=7)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tiny_params, raw_rows) -> Path:
    """A tiny random-init builtin base model + ChatML tokenizer saved like models/base/ (no pre-training)."""

    out = tmp_path_factory.mktemp("tiny_base") / "base"
    texts = [r["system"] + "\n" + r["question"] + "\n" + r["chosen"] + "\n" + r["rejected"] for r in raw_rows]
    tokenizer = builtin.build_tokenizer(texts, tiny_params.base.builtin.vocab_size)
    model = builtin.build_model(tiny_params.base.builtin, tokenizer, seed=tiny_params.seed)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return out
