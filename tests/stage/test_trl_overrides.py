# ruff: noqa: F811 (the fixtures imported from test_train are arguments here)
"""Tripwires for a trl upgrade (issue 23): every override in dpo_pipeline/train/trl_glue.py is still CALLED by
the installed trl in the real reference and train stages (a renamed or inlined internal would leave our code
dead without a word: signatures alone do not show it), and train.share_prompt really runs one row per pair."""

from __future__ import annotations

from collections import Counter

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.train import reference as reference_lib
from dpo_pipeline.train import trl_glue
from tests.conftest import replace_params
from tests.stage.test_train import (  # noqa: F401 - the session fixtures this module reuses
    pairs_of,
    reference_dir,
    run_train,
    tokenized_dir,
    train_params,
)


def counting(calls: Counter, trainers: list):
    """trl_glue.trainer_class, each override wrapped to count its calls; the trainers built are kept."""

    original = trl_glue.trainer_class

    def trainer_class(share_prompt: bool):
        base = original(share_prompt)

        def wrap(name):
            def method(self, *args, **kwargs):
                calls[name] += 1
                return getattr(base, name)(self, *args, **kwargs)

            return method

        def init(self, *args, **kwargs):
            trainers.append(self)
            base.__init__(self, *args, **kwargs)

        return type("Counting", (base,), {"__init__": init, **{n: wrap(n) for n in trl_glue.OVERRIDES}})

    return trainer_class


class StopAfterFirstSave:
    """A callback that ends the first run right after its first checkpoint, as a crash would."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_save(self, args, state, control, **kwargs):
        raise RuntimeError("stopped after the first checkpoint")


def test_every_override_is_called_by_trl_and_prompts_are_shared(
    monkeypatch,
    tmp_path,
    train_params,
    tiny_base_dir,
    tokenized_dir,
    reference_dir,
):

    params = replace_params(train_params, train={"save_steps": 1, "max_steps": 2})
    assert params.train.share_prompt
    calls: Counter = Counter()
    trainers: list = []
    monkeypatch.setattr(trl_glue, "trainer_class", counting(calls, trainers))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    reference_lib.compute(params, tiny_base_dir, tokenized_dir, pairs_of(tokenized_dir))
    (scoring,) = trainers
    assert scoring.share_outcomes.get("shared", 0) > 0 and not scoring.share_outcomes.get("fallback")

    with pytest.raises(RuntimeError, match="first checkpoint"):
        run_train(
            params,
            tiny_base_dir,
            tokenized_dir,
            reference_dir,
            tmp_path,
            extra_callbacks=[StopAfterFirstSave()],
        )
    run_train(params, tiny_base_dir, tokenized_dir, reference_dir, tmp_path)  # resumes from that checkpoint
    _, interrupted, resumed = trainers
    assert resumed.state.global_step == params.train.max_steps
    for trainer in (interrupted, resumed):
        assert trainer.share_outcomes.get("shared", 0) > 0 and not trainer.share_outcomes.get("fallback")

    never = [name for name in trl_glue.OVERRIDES if not calls[name]]
    assert not never, f"trl no longer calls the override(s) {never}: they do nothing now"


def test_a_trl_without_an_overridden_method_is_refused_by_name(monkeypatch):
    from trl import DPOTrainer

    monkeypatch.delattr(DPOTrainer, "_precompute_ref_logps")
    with pytest.raises(StageError, match=r"has no DPOTrainer\._precompute_ref_logps.*constraints\.txt"):
        trl_glue.trainer_class(share_prompt=True)
