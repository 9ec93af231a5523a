# ruff: noqa: F811 (the fixtures imported from test_train are arguments here)
"""Issue 24: a damaged checkpoint never wedges training. Each file of a real checkpoint is damaged in turn: the
checkpoint is set aside with one warning naming it and the file, and training resumes from the one before it
(two are kept), or starts from zero when none is left."""

from __future__ import annotations

import logging
import shutil

import pytest

from dpo_pipeline.train import dpo
from tests.conftest import replace_params
from tests.stage.test_train import (  # noqa: F401 - the session fixtures this module reuses
    pairs_of,
    reference_dir,
    run_train,
    tokenized_dir,
    train_params,
)


class StopAfterSecondSave:
    """Ends a run right after its second checkpoint, as a crash would."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= 2:
            raise RuntimeError("stopped after the second checkpoint")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, train_params, tiny_base_dir, tokenized_dir, reference_dir):
    out = tmp_path_factory.mktemp("interrupted")
    params = replace_params(train_params, train={"save_steps": 1, "max_steps": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        with pytest.raises(RuntimeError, match="second checkpoint"):
            run_train(
                params,
                tiny_base_dir,
                tokenized_dir,
                reference_dir,
                out,
                extra_callbacks=[StopAfterSecondSave()],
            )
    (run_dir,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return {"out": out, "run_dir": run_dir, "params": params}


def damage(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_both_checkpoints_are_whole_before_any_damage(interrupted):
    assert dpo.latest_checkpoint(interrupted["run_dir"]).name == "checkpoint-2"


def test_each_damaged_file_sets_the_checkpoint_aside_and_the_one_before_is_used(
    interrupted, tmp_path, caplog
):
    files = sorted(p.name for p in (interrupted["run_dir"] / "checkpoint-2").iterdir())
    checked = [n for n in files if n.endswith((".json", ".safetensors", ".pt", ".pth", ".bin"))]
    assert {"adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"} <= set(checked)
    for name in checked:
        copy = tmp_path / name
        shutil.copytree(interrupted["run_dir"], copy)
        damage(copy / "checkpoint-2" / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=dpo.logger.name):
            assert dpo.latest_checkpoint(copy) == copy / "checkpoint-1", name
        (record,) = caplog.records
        assert f"checkpoint-2 cannot be resumed from ({name}:" in record.getMessage()
        assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2.damaged"]
    # both damaged: training starts from zero
    shutil.copytree(interrupted["run_dir"], tmp_path / "both")
    for step in (1, 2):
        damage(tmp_path / "both" / f"checkpoint-{step}" / "adapter_model.safetensors")
    assert dpo.latest_checkpoint(tmp_path / "both") is None


def test_training_resumes_past_a_truncated_adapter_in_the_newest_checkpoint(
    interrupted, train_params, tiny_base_dir, tokenized_dir, reference_dir, monkeypatch
):
    """The issue's case: a truncated adapter_model.safetensors made every later `dvc repro train` end in a
    safetensors traceback until someone deleted .scratch by hand."""
    import mlflow

    out, run_dir = interrupted["out"], interrupted["run_dir"]
    damage(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    metrics = run_train(interrupted["params"], tiny_base_dir, tokenized_dir, reference_dir, out)
    assert metrics["train_steps"] == interrupted["params"].train.max_steps
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'")
    assert list(runs["tags.resumed_from"]) == [str(run_dir / "checkpoint-1")]
