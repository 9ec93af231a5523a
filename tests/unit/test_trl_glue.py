"""dpo_pipeline.train.trl_glue against the installed trl: the facts it states and the internals it overrides.
A trl upgrade that renames a method, changes its arguments or the loss-type list fails here, not in a run."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

from dpo_pipeline import config
from dpo_pipeline.train import trl_glue


def trl_source(name: str) -> str:
    spec = importlib.util.find_spec("trl")
    return (Path(spec.origin).parent / "trainer" / name).read_text(encoding="utf-8")


def test_the_loss_types_are_the_installed_trls():
    help_text = re.search(r"loss_type: list\[str\] = field\((.*?)\n    \)", trl_source("dpo_config.py"), re.S)
    assert help_text, "DPOConfig.loss_type moved: check config.DPO_LOSS_TYPES by hand"
    assert tuple(re.findall(r"`'([a-z_]+)'`", help_text.group(1))) == config.DPO_LOSS_TYPES
    dispatch = set(re.findall(r'loss_type == "([a-z_]+)"', trl_source("dpo_trainer.py")))
    assert set(config.DPO_LOSS_TYPES) <= dispatch | {"sigmoid"}


def test_the_label_smoothing_rules_are_the_installed_trls():
    source = trl_source("dpo_trainer.py")
    assert '"exo_pair" in self.loss_types and self.label_smoothing == 0.0' in source
    assert '"robust" in self.loss_types and not (0.0 <= self.label_smoothing < 0.5)' in source
    exo, robust = (config.LABEL_SMOOTHING_RULES[k][0] for k in ("exo_pair", "robust"))
    assert not exo(0.0) and exo(1e-3) and robust(0.0) and not robust(0.5)


def upstream_parameters(cls, name: str) -> list[str]:
    """The first concrete signature of `name` along the MRO (a decorator may hide one behind *args, **kwargs)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            params = list(inspect.signature(inspect.unwrap(vars(klass)[name])).parameters)
            if params != ["self", "args", "kwargs"]:
                return params
    raise AssertionError(f"no concrete signature for {name}")


def test_every_overridden_trainer_method_exists_upstream_with_the_same_arguments():
    from trl import DPOTrainer

    ours = trl_glue.trainer_class(share_prompt=True)
    overridden = [n for n, f in vars(ours).items() if inspect.isfunction(f) and not n.startswith("__")]
    assert overridden, "nothing overridden?"
    for name in overridden:
        upstream = getattr(DPOTrainer, name, None)
        assert upstream is not None, f"DPOTrainer.{name} is gone: trl_glue overrides nothing"
        mine = list(inspect.signature(getattr(ours, name)).parameters)
        theirs = upstream_parameters(DPOTrainer, name)
        assert mine == theirs, f"DPOTrainer.{name}{theirs} != ours {mine}"


def test_every_listed_optimizer_builds_and_steps_with_the_pinned_packages(tmp_path):
    """config.OPTIMIZERS: names transformers knows, each building and stepping an optimizer here (CPU), so a
    name config accepts never fails in train; a name transformers dropped fails this test, not a run."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    assert set(config.OPTIMIZERS) <= {o.value for o in OptimizerNames}
    model = torch.nn.Linear(64, 64)
    for name in config.OPTIMIZERS:
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, use_cpu=True, report_to=[])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer = cls(list(model.parameters()), **kwargs)
        model(torch.randn(2, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_every_listed_scheduler_builds_from_warmup_and_total_steps_alone():
    import torch
    from transformers.optimization import get_scheduler
    from transformers.trainer_utils import SchedulerType

    assert set(config.LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    for name in config.LR_SCHEDULERS:
        optimizer.step()
        get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10).step()
    # the ones left out really need more than params give them
    for name in ("cosine_with_min_lr", "warmup_stable_decay", "greedy", "reduce_lr_on_plateau"):
        try:
            get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10).step()
        except (ValueError, TypeError):
            continue
        raise AssertionError(f"{name} builds without arguments now: add it to config.LR_SCHEDULERS")


def test_the_installed_trl_transformers_and_peft_are_the_tested_ones():
    """A lock bump that moves any of them outside trl_glue.TESTED fails here: re-check the overrides, then
    move the range (train and reference warn in one line at start-up when a user runs other versions)."""
    from importlib import metadata

    installed = {name: metadata.version(name) for name in trl_glue.TESTED}
    assert trl_glue.untested_versions(installed) == []


def test_versions_outside_the_tested_range_are_named():
    ok = {"trl": "1.16.3", "transformers": "5.17.0", "peft": "0.21.2"}
    assert trl_glue.untested_versions(ok) == []
    assert trl_glue.untested_versions({**ok, "trl": "1.17.0", "transformers": "5.16.1"}) == [
        "trl 1.17.0",
        "transformers 5.16.1",
    ]
    assert trl_glue.untested_versions({**ok, "peft": "0.22.0.dev0"}) == ["peft 0.22.0.dev0"]


def test_the_version_line_warns_outside_the_range(monkeypatch, caplog):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.99.0" if name == "trl" else real(name))
    with caplog.at_level("INFO", logger=trl_glue.logger.name):
        trl_glue.log_versions()
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "trl 1.99.0 untested" in record.getMessage()
