"""train.method and the DPO loss surface in params: every method/loss-specific key is refused where the chosen
method or loss ignores it, and the inert values are trl 1.16's own defaults."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from dpo_pipeline import config
from dpo_pipeline.config import METHOD_PARAMS, ConfigError
from tests.conftest import REPO


def params_with(**train):
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    data["train"].update(train)
    return config.parse(data, "params.yaml")


def test_label_smoothing_with_sigmoid_is_refused_naming_the_key_and_its_users():
    with pytest.raises(ConfigError) as err:
        params_with(loss_type="sigmoid", label_smoothing=0.1)
    assert str(err.value) == (
        "params.yaml: train.label_smoothing: 0.1 has no effect with loss_type sigmoid in trl 1.16; it is used by "
        "robust, exo_pair, aot, aot_unpaired (and by method cpo, simpo)"
    )
    assert params_with(loss_type="robust", label_smoothing=0.1).train.label_smoothing == 0.1
    assert params_with(loss_type=["sigmoid", "robust"], label_smoothing=0.1).train.label_smoothing == 0.1
    assert params_with(method="simpo", label_smoothing=0.1).train.method == "simpo"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            {"simpo_gamma": 1.0},
            "train.simpo_gamma: 1.0 has no effect with train.method dpo in trl 1.16; it is used by method simpo",
        ),
        ({"method": "orpo", "cpo_alpha": 0.5}, "train.cpo_alpha: 0.5 has no effect with train.method orpo"),
        (
            {"method": "kto", "loss_type": ["sigmoid", "sft"]},
            "train.loss_type: ['sigmoid', 'sft'] has no effect with train.method kto",
        ),
        ({"method": "simpo", "ld_alpha": 0.5}, "train.ld_alpha: 0.5 has no effect with train.method simpo"),
        ({"desirable_weight": 2.0}, "train.desirable_weight: 2.0 has no effect with train.method dpo"),
        (
            {"discopop_tau": 0.1},
            "train.discopop_tau: 0.1 has no effect with loss_type sigmoid in trl 1.16; it is used by discopop",
        ),
        (
            {"f_alpha_divergence_coef": 0.3},
            "train.f_alpha_divergence_coef: 0.3 has no effect with f_divergence_type reverse_kl",
        ),
        (
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]},
            "train.loss_weights: expected one weight per train.loss_type entry (2)",
        ),
        (
            {"loss_type": ["sigmoid", "sigmoid"]},
            "train.loss_type: expected a DPO loss type or a list of distinct ones",
        ),
        ({"loss_type": ["sigmoid", "nope"]}, "train.loss_type: expected a trl DPO loss type (sigmoid, hinge"),
        (
            {"use_weighting": True, "loss_type": ["sigmoid", "sft"]},
            "train.use_weighting: expected false with loss_type sft",
        ),
        (
            {"f_divergence_type": "js_divergence", "loss_type": "bco_pair"},
            "train.f_divergence_type: expected reverse_kl with loss_type bco_pair",
        ),
        ({"ld_alpha": 1.5}, "train.ld_alpha: expected null (off) or a number in [0, 1]"),
        (
            {"method": "kto", "per_device_train_batch_size": 1},
            "train.per_device_train_batch_size: expected at least 2 with method kto",
        ),
        ({"method": "sppo"}, "train.method: expected one of 'dpo' | 'simpo' | 'cpo' | 'orpo' | 'kto'"),
    ],
)
def test_a_setting_without_effect_or_out_of_range_is_refused(train, message):
    with pytest.raises(ConfigError) as err:
        params_with(**train)
    assert message in str(err.value)


def test_the_documented_combinations_load():
    rpo = params_with(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]).train
    assert config.loss_types(rpo) == ["sigmoid", "sft"]
    mpo = params_with(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]).train
    assert mpo.loss_weights == [0.8, 0.2, 1.0]
    assert params_with(ld_alpha=0.5, use_weighting=True).train.ld_alpha == 0.5
    assert params_with(
        f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
    ).train.f_divergence_type
    for method in config.METHODS:
        assert params_with(method=method).train.method == method


def test_inert_values_are_the_installed_trls_defaults():
    """Leaving a key at its inert value must mean trl's own default, or "inert" would still change the run."""
    from trl import DPOConfig, KTOConfig
    from trl.experimental.cpo import CPOConfig

    defaults = {}
    for cls in (DPOConfig, CPOConfig, KTOConfig):
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                defaults.setdefault(field.name, field.default)
            elif field.default_factory is not dataclasses.MISSING:
                defaults.setdefault(field.name, field.default_factory())
    defaults["loss_type"] = DPOConfig.__dataclass_fields__["loss_type"].default_factory()[0]
    defaults["loss_weights"] = []  # trl's None: 1.0 each; params write []
    for key, rule in METHOD_PARAMS.items():
        assert defaults[key] == rule["inert"], key


def test_the_label_smoothing_readers_are_the_installed_trls():
    """The DPO losses whose branch in DPOTrainer._compute_loss reads label_smoothing are exactly the table's."""
    import inspect
    import re

    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    branches = re.split(r'\n\s+(?:el)?if loss_type == "', source)[1:]
    readers = {b.split('"', 1)[0] for b in branches if "label_smoothing" in b.split("\n            el", 1)[0]}
    assert readers == set(config.LABEL_SMOOTHING_LOSSES)
    discopop = {b.split('"', 1)[0] for b in branches if "discopop_tau" in b.split("\n            el", 1)[0]}
    assert discopop == set(METHOD_PARAMS["discopop_tau"]["losses"])
