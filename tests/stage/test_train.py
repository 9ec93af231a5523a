"""train stage on the tiny 4-bit model: outputs, LoRA vs base weights, cached vs on-the-fly reference,
determinism, resume after kill -9, NaN guard."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_pipeline import tracking
from dpo_pipeline.data import tables, tokens
from dpo_pipeline.io import sha256_tree
from dpo_pipeline.models import loading
from dpo_pipeline.train import dpo, trl_glue
from dpo_pipeline.train import pairs as pairs_lib
from tests.conftest import REPO, replace_params

ANSWER_END = "<|im_end|>\n"


# ---------------------------------------------------------------------------------------------------------
# Fixture data: raw rows formatted as the prepare stage does (ChatML), written with pyarrow


def chatml_prompt(system: str, question: str) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return head + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def write_pairs(root: Path, rows: list[dict], tokenizer, params, n_test: int) -> Path:
    """data/prepared-like and data/tokenized-like folders under `root` from raw rows: the ChatML strings as
    prepare writes them, the ids by the tokenize stage's own function (rows over the length limits dropped
    there). Returns root / "tokenized"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for i, row in enumerate(rows):
        if not row["chosen"].strip() or not row["rejected"].strip() or row["chosen"] == row["rejected"]:
            continue
        records.append(
            {
                "id": f"row{i:04d}",
                "system": row["system"],
                "question": row["question"],
                "prompt": chatml_prompt(row["system"], row["question"]),
                "chosen": row["chosen"] + ANSWER_END,
                "rejected": row["rejected"] + ANSWER_END,
            }
        )
    for name in ("prepared", "tokenized"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for split, part in {"test": records[:n_test], "train": records[n_test:]}.items():
        table = pa.Table.from_pylist(part)
        pq.write_table(table, root / "prepared" / f"{split}.parquet")
        tokenized, _counts = tokens.tokenize_split(table, tokenizer, params.data)
        pq.write_table(tokenized, root / "tokenized" / f"{split}.parquet")
    write_selection(root, params)
    return root / "tokenized"


def write_selection(root: Path, params) -> Path:
    """root/pairs from root/tokenized, by the pairs stage's own functions (no tracking run)."""

    selected, order, _metrics = pairs_lib.build(params, root / "tokenized")
    pairs_lib.write(root / "pairs", selected, order)
    return root / "pairs"


def pairs_of(tokenized_dir: Path) -> Path:
    return Path(tokenized_dir).parent / "pairs"


@pytest.fixture(scope="session")
def train_params(tiny_params):
    return replace_params(tiny_params, train={"lora": {"r": 4, "alpha": 8}})


@pytest.fixture(scope="session")
def tokenized_dir(tmp_path_factory, tiny_base_dir, raw_rows, train_params) -> Path:
    from dpo_pipeline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_base_dir)
    return write_pairs(tmp_path_factory.mktemp("pairs"), raw_rows[:60], tokenizer, train_params, 12)


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory, train_params, tiny_base_dir, tokenized_dir) -> Path:
    from stages import reference

    out = tmp_path_factory.mktemp("reference") / "reference"
    reference.run(train_params, tiny_base_dir, tokenized_dir, out, pairs_of(tokenized_dir))
    return out


def run_train(params, base_dir, tokenized_dir, reference_dir, out: Path, **kwargs) -> dict:
    from stages import train

    return train.run(
        params,
        base_dir=base_dir,
        tokenized_dir=tokenized_dir,
        reference_dir=reference_dir,
        adapter_dir=out / "adapter",
        metrics_path=out / "metrics" / "train.json",
        history_path=out / "metrics" / "train_history.csv",
        checkpoint_dir=out / "checkpoints",
        pairs_dir=pairs_of(tokenized_dir),
        **kwargs,
    )


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory, mlflow_template, train_params, tiny_base_dir, tokenized_dir, reference_dir
) -> Path:
    """One uninterrupted run with the cached reference (the baseline other tests compare with), recorded in
    its own MLflow store (`trained / "mlflow.db"`)."""
    out = tmp_path_factory.mktemp("trained")
    base_digest = hashlib.sha256((tiny_base_dir / "model.safetensors").read_bytes()).hexdigest()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    shutil.copyfile(mlflow_template, out / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    try:
        run_train(train_params, tiny_base_dir, tokenized_dir, reference_dir, out)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    (out / "base_digest_before").write_text(base_digest)
    return out


def train_runs(params, uri: str | None = None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")


def load_adapter(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_adapters_close(a: dict, b: dict, atol: float = 1e-3, rtol: float = 1e-2) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=rtol), name


# ---------------------------------------------------------------------------------------------------------
# Outputs


def test_outputs_and_metrics(trained, train_params):

    adapter = trained / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "models/base"
    # Sorted, not in peft's hash-seed order: the same weights must give the same adapter folder hash.
    assert config["target_modules"] == sorted(train_params.train.lora.target_modules)
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()
    assert not list(adapter.glob("*.bin")), "pickle weights must never be written"

    metrics = json.loads((trained / "metrics" / "train.json").read_text())
    timing = json.loads((trained / "metrics" / "train_timing.json").read_text())
    # DPO logs every key but ORPO's log-odds of the chosen answer (an optional key, left out when not logged);
    # the run-dependent ones (timings, throughput, memory) go to train_timing.json, out of the DVC metrics.
    assert set(metrics) == set(dpo.SUMMARY_METRIC_KEYS) - {"eval_log_odds_chosen"}
    assert set(timing) == set(dpo.RUN_DEPENDENT_KEYS)
    metrics = {**metrics, **timing}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["train_steps"] == train_params.train.max_steps
    assert 0.0 <= metrics["eval_rewards_accuracies"] <= 1.0
    assert metrics["pairs_per_s"] > 0 and metrics["tokens_per_s"] > metrics["pairs_per_s"]
    assert 0.0 <= metrics["pad_fraction"] < 1.0
    assert metrics["peak_memory_mb"] > 50

    with open(trained / "metrics" / "train_history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(dpo.HISTORY_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(1, train_params.train.max_steps + 1))
    assert float(rows[-1]["loss"]) == pytest.approx(metrics["train_loss"])

    # The merge stage's model card reads the params and the deterministic metrics from the adapter folder.
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["params"]["train"]["lora"]["r"] == 4 and summary["params"]["seed"] == train_params.seed
    assert summary["params"]["data.max_length"] == train_params.data.max_length
    assert summary["metrics"] == {k: metrics[k] for k in dpo.SUMMARY_METRIC_KEYS if k in metrics}
    assert "train_runtime_s" not in summary["metrics"] and "mlflow_run_id" not in summary

    # A finished run deletes its checkpoints.
    assert not any((trained / "checkpoints").glob("*/checkpoint-*"))


def test_lora_weights_changed_and_base_did_not(trained, tiny_base_dir):
    import torch
    from peft import PeftModel

    from dpo_pipeline.models.loading import load_model

    assert (
        hashlib.sha256((tiny_base_dir / "model.safetensors").read_bytes()).hexdigest()
        == (trained / "base_digest_before").read_text()
    )
    weights = load_adapter(trained / "adapter")
    assert weights and all("lora_" in name for name in weights)
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b), "LoRA B starts at zero: training must move it"

    base = load_model(tiny_base_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(load_model(tiny_base_dir), str(trained / "adapter"))
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        assert torch.equal(tensor, base_state[clean]), name
    ids = torch.tensor([[4, 20, 30, 40, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)


def test_mlflow_run(trained, train_params):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{trained / 'mlflow.db'}"
    (run,) = train_runs(train_params, uri)
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["chat_template.sha256"]) == 16
    assert run.data.tags["collapse_warning"] == "false"
    assert run.data.tags["resumed_from"] == ""
    assert run.data.params["train.beta"] == str(train_params.train.beta)
    assert run.data.params["train.lora.r"] == "4"
    steps = list(range(1, train_params.train.max_steps + 1))
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "rewards/margins")
    assert [m.step for m in history] == steps, "transformers' MLflow callback logs every logging step"
    metrics = json.loads((trained / "metrics" / "train.json").read_text())
    for key, value in metrics.items():
        assert run.data.metrics[f"final_{key}"] == pytest.approx(value), key
    assert run.data.tags["output.adapter.path"]
    assert run.data.tags["input.reference.hash"].startswith("sha256:")  # no dvc.lock here: hashed by us
    # the lineage merge, evaluate and report look up: the adapter's content hash as a tag, no run id in a file
    assert run.data.tags[tracking.ADAPTER_SHA256_TAG] == sha256_tree(trained / "adapter")
    # no run id in any file: train_timing.json holds the run-dependent figures only
    assert set(json.loads((trained / "metrics" / "train_timing.json").read_text())) == set(
        dpo.RUN_DEPENDENT_KEYS
    )
    assert mlflow.active_run() is None


# ---------------------------------------------------------------------------------------------------------
# Reference log-probs: cached stage vs trl on the fly


def test_cached_reference_matches_on_the_fly(
    tmp_path, trained, train_params, tiny_base_dir, tokenized_dir, reference_dir
):
    import pyarrow.parquet as pq
    import torch

    # trl's own precompute inside a train-configured trainer (real LoRA adapter, disabled; trl's two rows per
    # pair, while the reference stage ran one row per pair, train.share_prompt), on the selected training pairs ...
    tokenizer = loading.load_tokenizer(tiny_base_dir)
    selected = sorted(pairs_lib.read_selected(pairs_of(tokenized_dir))["train"])
    dataset = pairs_lib.to_dataset(
        pairs_lib.rows_in_order(tables.read_tokenized(tokenized_dir, "train"), selected, tokenized_dir)
    )
    params = replace_params(train_params, train={"precompute_ref": True})
    assert params.train.share_prompt, "the reference fixture should share prompts (the profile's setting)"
    trainer = trl_glue.trainer_class(share_prompt=False)(
        model=loading.load_policy(tiny_base_dir, params.train),
        args=dpo.dpo_config(params, tmp_path / "ckpt"),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=loading.lora_config(params.train.lora),
    )
    on_the_fly = {
        c: torch.tensor(trainer.train_dataset[c]) for c in ("ref_chosen_logps", "ref_rejected_logps")
    }
    cached = pq.read_table(reference_dir / "train.parquet")
    assert cached.column("id").to_pylist() == dataset["id"]
    for name, values in on_the_fly.items():
        assert torch.allclose(torch.tensor(cached.column(name).to_pylist()), values, atol=1e-4), name

    # ... and the trained adapters agree. This run also switches on gradient checkpointing (the 7B recipe's
    # setting, otherwise untested on CPU), which recomputes the same activations and must not change the numbers.
    uncached = replace_params(train_params, train={"precompute_ref": False, "gradient_checkpointing": True})
    out = tmp_path / "uncached"
    metrics = run_train(uncached, tiny_base_dir, tokenized_dir, tmp_path / "no-reference-needed", out)
    assert_adapters_close(load_adapter(out / "adapter"), load_adapter(trained / "adapter"))
    baseline = json.loads((trained / "metrics" / "train.json").read_text())
    assert metrics["train_loss"] == pytest.approx(baseline["train_loss"], abs=1e-4)
    assert metrics["eval_rewards_margins"] == pytest.approx(baseline["eval_rewards_margins"], abs=1e-4)


def test_one_row_per_pair_trains_the_adapter_trls_two_rows_train(
    tmp_path, train_params, tiny_base_dir, tokenized_dir
):
    """train.share_prompt on and off: the same adapter and metrics (up to float summation order). LoRA dropout
    is off in both: its random masks have other shapes in the two layouts, so with dropout the runs draw other
    noise (with share_prompt both answers of a pair see one mask on their shared prompt)."""
    runs = {}
    for share in (True, False):
        params = replace_params(
            train_params, train={"share_prompt": share, "precompute_ref": False, "lora": {"dropout": 0.0}}
        )
        out = tmp_path / f"share-{share}"
        runs[share] = run_train(params, tiny_base_dir, tokenized_dir, tmp_path / "no-reference-needed", out)
    shared, two_rows = (load_adapter(tmp_path / f"share-{share}" / "adapter") for share in (True, False))
    assert_adapters_close(shared, two_rows)
    for key in ("train_loss", "eval_loss", "eval_rewards_margins", "rewards_chosen"):
        assert runs[True][key] == pytest.approx(runs[False][key], abs=1e-4), key
    assert runs[True]["train_steps"] == runs[False]["train_steps"]


def test_stale_reference_is_refused(tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir):
    from dpo_pipeline.errors import StageError

    # A param the reference declares (the seed no longer is one: it cannot change a reference log-prob).
    other = replace_params(train_params, train={"bnb_4bit_quant_type": "fp4"})
    with pytest.raises(StageError, match="meta.json: params"):
        run_train(other, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_seed_gives_byte_identical_adapter(
    tmp_path, trained, train_params, tiny_base_dir, tokenized_dir, reference_dir
):
    run_train(train_params, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)
    # The whole folder, train_summary.json included: DVC hashes it, so identical runs must give identical bytes.
    files = sorted(p.name for p in (trained / "adapter").iterdir())
    assert {"adapter_model.safetensors", "adapter_config.json", "train_summary.json"} <= set(files)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == files
    for name in files:
        assert (tmp_path / "adapter" / name).read_bytes() == (trained / "adapter" / name).read_bytes(), name


KILLABLE = """
import os, sys, time
sys.path.insert(0, {repo!r})
from transformers import TrainerCallback
from stages import train
from dpo_pipeline import config
from tests.conftest import replace_params

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(1.0)  # leave time to kill the process between two checkpoints

params = replace_params(config.load({repo!r} + "/params.yaml"), **{overrides!r})
train.run(params, {base!r}, {tokenized!r}, {reference!r}, {out!r} + "/adapter", {out!r} + "/train.json",
          {out!r} + "/history.csv", {out!r} + "/checkpoints", extra_callbacks=[Slow()],
          pairs_dir=os.path.join(os.path.dirname({tokenized!r}), "pairs"))
"""


def test_resume_after_kill_matches_uninterrupted(
    tmp_path, trained, train_params, tiny_base_dir, tokenized_dir, reference_dir
):

    overrides = {
        name: (dataclasses.asdict(getattr(train_params, name)) if name != "seed" else train_params.seed)
        for name in ("seed", "base", "data", "train")
    }
    script = KILLABLE.format(
        repo=str(REPO),
        overrides=overrides,
        base=str(tiny_base_dir),
        tokenized=str(tokenized_dir),
        reference=str(reference_dir),
        out=str(tmp_path),
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ))
    first = None
    deadline = time.time() + 180
    try:
        while time.time() < deadline and child.poll() is None:
            first = next(
                (p for p in (tmp_path / "checkpoints").glob("*/checkpoint-2/trainer_state.json")), None
            )
            if first:
                break
            time.sleep(0.05)
        assert first is not None, "the child never wrote its first checkpoint"
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "adapter").exists(), "a killed run publishes nothing"

    assert dpo.latest_checkpoint(first.parent.parent).name == "checkpoint-2"
    run_train(train_params, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)
    resumed_history = (tmp_path / "metrics" / "train_history.csv").read_text()
    assert resumed_history == (trained / "metrics" / "train_history.csv").read_text(), (
        "history spans both attempts"
    )
    # Tighter than one bf16 ulp: a resume that changed the adapter dtype or the data order would fail.
    assert_adapters_close(
        load_adapter(tmp_path / "adapter"), load_adapter(trained / "adapter"), atol=1e-7, rtol=1e-4
    )
    assert not any((tmp_path / "checkpoints").glob("*/checkpoint-*"))

    runs = train_runs(train_params)
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "KILLED"], "the killed attempt is closed by the next run"
    resumed = next(r for r in runs if r.info.status == "FINISHED")
    assert resumed.data.tags["resumed_from"].endswith("checkpoint-2")


# ---------------------------------------------------------------------------------------------------------
# Guards


def test_nan_loss_stops_training_and_publishes_nothing(
    tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir, monkeypatch
):
    from trl import DPOTrainer

    from dpo_pipeline.errors import StageError

    original = DPOTrainer.compute_loss

    def nan_on_second_step(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 1 else loss

    monkeypatch.setattr(DPOTrainer, "compute_loss", nan_on_second_step)
    with pytest.raises(StageError, match="training loss is nan at step 2"):
        run_train(train_params, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "metrics").exists()
    (run,) = train_runs(train_params)
    assert run.info.status == "FAILED"


def test_missing_tokenized_data_is_a_clear_error(tmp_path, train_params, tiny_base_dir, reference_dir):
    from dpo_pipeline.errors import StageError

    with pytest.raises(StageError, match=r"train\.parquet: tokenized split not found"):
        run_train(train_params, tiny_base_dir, tmp_path / "nowhere", reference_dir, tmp_path)


def test_a_lora_target_the_base_lacks_fails_before_any_weights_load(
    tmp_path, train_params, tiny_base_dir, tokenized_dir, reference_dir, monkeypatch
):
    """peft would silently skip 'k_prj' next to a good name; train refuses it from config.json, first thing."""
    from dpo_pipeline.errors import StageError
    from stages import train as train_stage

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the LoRA targets were checked")

    monkeypatch.setattr(train_stage.loading, "load_policy", no_weights)
    other = replace_params(train_params, train={"lora": {"target_modules": ["q_proj", "k_prj"]}})
    with pytest.raises(
        StageError, match=r"base/config\.json: train\.lora\.target_modules: 'k_prj' names no module"
    ):
        run_train(other, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)
    assert not (tmp_path / "adapter").exists()
