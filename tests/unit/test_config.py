"""params.yaml -> dataclasses: every recipe loads, and every kind of bad file fails naming its key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from dpo_pipeline import config
from dpo_pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
# The distilabel recipe ships without a dataset revision on purpose (none could be verified offline): it must fail
# until the user pins one (test_the_distilabel_recipe_waits_for_a_pinned_revision).
UNPINNED = REPO / "recipes" / "neuralhermes-2.5-distilabel.yaml"
PARAM_FILES = [REPO / "params.yaml", *sorted(p for p in (REPO / "recipes").glob("*.yaml") if p != UNPINNED)]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


def test_the_distilabel_recipe_waits_for_a_pinned_revision():
    with pytest.raises(
        ConfigError, match=r"data\.hub_revision: expected a 40-hex commit sha when data\.source is hub"
    ):
        config.load(UNPINNED)
    data = yaml.safe_load(UNPINNED.read_text())
    data["data"]["hub_revision"] = "0" * 40
    recipe = config.parse(data, str(UNPINNED))
    f = recipe.data.filters
    assert (recipe.data.format, f.drop_ties, f.min_chosen_score, f.drop_flagged) == (
        "argilla_orca",
        True,
        8.0,
        ["in_gsm8k_train"],
    )
    main = config.load(REPO / "recipes" / "neuralhermes-2.5.yaml")
    assert recipe.train == main.train and recipe.base == main.base and recipe.eval == main.eval


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_loads(path):
    params = config.load(path)
    assert params.data.max_length > params.data.max_prompt_length
    from dpo_pipeline.config import DPO_LOSS_TYPES

    assert params.train.loss_type in DPO_LOSS_TYPES


def test_at_least_the_7b_recipe_exists():
    recipe = config.load(REPO / "recipes" / "neuralhermes-2.5.yaml")
    assert recipe.base.name == "teknium/OpenHermes-2.5-Mistral-7B"
    # The article's hyperparameters.
    t = recipe.train
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (16, 16, 0.05)
    assert set(t.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (t.beta, t.learning_rate, t.lr_scheduler_type) == (0.1, 5.0e-5, "cosine")
    assert (t.warmup_steps, t.max_steps) == (100, 200)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (4, 4)
    assert (recipe.data.max_prompt_length, recipe.data.max_length) == (1024, 1536)
    assert (t.optim, t.precision, t.gradient_checkpointing, t.load_in_4bit) == (
        "paged_adamw_32bit",
        "bf16",
        True,
        True,
    )


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_key_line_has_a_comment(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- {"):
            continue
        if re.match(r"^[\w.-]+:", stripped):
            assert "#" in line, f"{path.name}:{number}: key without a comment: {line!r}"


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("train.learnig_rate", 1.0, r"train\.learnig_rate: unknown key"),
        ("train.beta", _DELETE, r"train\.beta: missing key"),
        ("train.max_steps", "ten", r"train\.max_steps: expected an integer"),
        ("train.learning_rate", "5e-5", r"train\.learning_rate: expected a number \(write floats with a dot"),
        ("train.learning_rate", -1.0, r"train\.learning_rate: expected a finite number > 0"),
        ("train.load_in_4bit", "yes", r"train\.load_in_4bit: expected true or false"),
        ("train.loss_type", "sigmod", r"train\.loss_type: expected a trl DPO loss type \(sigmoid, hinge"),
        # Issue 15: values that pass the types and cannot be meant
        ("seed", -1, r"seed: expected an integer >= 0, got -1"),
        ("train.beta", float("inf"), r"train\.beta: expected a finite number > 0, got inf"),
        ("eval.temperature", float("inf"), r"eval\.temperature: expected a finite number > 0"),
        ("merge.fidelity_max_abs", float("inf"), r"merge\.fidelity_max_abs: expected a finite number > 0"),
        ("base.builtin.intermediate_size", 0, r"base\.builtin\.intermediate_size: expected an integer > 0"),
        (
            "base.builtin.max_position_embeddings",
            100,
            r"base\.builtin\.max_position_embeddings: expected at least data\.max_length \(384\)",
        ),
        ("tracking.experiment", " ", r"tracking\.experiment: expected a non-empty MLflow experiment name"),
        ("train.label_smoothing", 0.7, r"train\.label_smoothing: expected a number in \[0, 0\.5\]"),
        (
            "train.optim",
            "adamw_torh",
            r"train\.optim: expected a transformers optimizer this install can run \(",
        ),
        ("train.optim", "galore_adamw", r"train\.optim: expected a transformers optimizer"),
        (
            "train.lr_scheduler_type",
            "cosine_annealing",
            r"train\.lr_scheduler_type: expected a transformers scheduler",
        ),
        ("train.lr_scheduler_type", "cosine_with_min_lr", r"train\.lr_scheduler_type: expected"),
        ("train.precision", "fp8", r"train\.precision: expected one of 'fp32' \| 'bf16' \| 'fp16'"),
        ("train.lora.target_modules", "q_proj", r"train\.lora\.target_modules: expected list of str"),
        (
            "data.max_length",
            100,
            r"data\.max_length: expected an integer greater than data\.max_prompt_length",
        ),
        ("data.test_fraction", 1.5, r"data\.test_fraction: expected a number strictly between 0 and 1"),
        ("base.source", "hub", r"base\.revision: expected a 40-hex commit sha"),
        (
            "base.trust_remote_code",
            True,
            r"base\.trust_remote_code: expected false unless base\.revision pins",
        ),
        ("eval.tasks", [{"name": "x"}], r"eval\.tasks\[0\]\.num_fewshot: missing key"),
        # Issue 16: the report's and decontamination's settings
        (
            "report.significance_level",
            1.5,
            r"report\.significance_level: expected a number strictly between 0 and 1",
        ),
        (
            "report.calibration_tolerance",
            -0.1,
            r"report\.calibration_tolerance: expected a finite number >= 0",
        ),
        (
            "report.on_calibration_mismatch",
            "stop",
            r"report\.on_calibration_mismatch: expected one of 'warn' \| 'fail'",
        ),
        (
            "report.published",
            [
                {
                    **{
                        "task": "dpo_heldout_pref",
                        "metric": "acc_norm",
                        "value": 0.6,
                        "num_fewshot": 0,
                        "source": "s",
                        "confirmed": True,
                    },
                    "task": "hellaswag",
                }
            ],
            r"report\.published\[0\]\.task: expected one of eval\.tasks \(chatml_format, dpo_heldout_pref\)",
        ),
        (
            "report.published",
            [
                {
                    **{
                        "task": "dpo_heldout_pref",
                        "metric": "acc_norm",
                        "value": 0.6,
                        "num_fewshot": 0,
                        "source": "s",
                        "confirmed": True,
                    },
                    "value": 64.93,
                }
            ],
            r"report\.published\[0\]\.value: expected a fraction in \[0, 1\], lm-eval's scale",
        ),
        (
            "report.published",
            [
                {
                    **{
                        "task": "dpo_heldout_pref",
                        "metric": "acc_norm",
                        "value": 0.6,
                        "num_fewshot": 0,
                        "source": "s",
                        "confirmed": True,
                    },
                    "source": " ",
                }
            ],
            r"report\.published\[0\]\.source: expected where the figure",
        ),
        (
            "report.published",
            [
                {
                    "task": "dpo_heldout_pref",
                    "metric": "acc_norm",
                    "value": 0.6,
                    "num_fewshot": 0,
                    "source": "s",
                    "confirmed": True,
                },
                {
                    "task": "dpo_heldout_pref",
                    "metric": "acc_norm",
                    "value": 0.6,
                    "num_fewshot": 0,
                    "source": "s",
                    "confirmed": True,
                },
            ],
            r"report\.published\[1\]: expected one figure per task and metric",
        ),
        (
            "report.published",
            [
                {
                    **{
                        "task": "dpo_heldout_pref",
                        "metric": "acc_norm",
                        "value": 0.6,
                        "num_fewshot": 0,
                        "source": "s",
                        "confirmed": True,
                    },
                    "metric": "acc norm",
                }
            ],
            r"report\.published\[0\]\.metric: expected an lm-eval metric",
        ),
        ("decontamination.ngram", 0, r"decontamination\.ngram: expected an integer > 0"),
        ("decontamination.common_rows", 0, r"decontamination\.common_rows: expected an integer > 0"),
        # Issue 24: more values that pass the types and cannot be meant
        (
            "train.warmup_steps",
            60,
            r"train\.warmup_steps: expected fewer than train\.max_steps \(60\): a longer warm-up ends training "
            r"before the learning rate reaches train\.learning_rate, got 60",
        ),
        ("train.learning_rate", 5.0, r"train\.learning_rate: expected a learning rate <= 1"),
        (
            "eval.tasks",
            [{"name": "dpo_heldout_pref", "num_fewshot": -1}, {"name": "chatml_format", "num_fewshot": 0}],
            r"eval\.tasks\[0\]\.num_fewshot: expected an integer >= 0, got -1",
        ),
        (
            "eval.tasks",
            [{"name": "dpo_heldout_pref", "num_fewshot": 0}, {"name": "dpo_heldout_pref", "num_fewshot": 5}],
            r"eval\.tasks: expected each entry once \(dpo_heldout_pref is listed twice\)",
        ),
        (
            "train.lora.target_modules",
            ["q_proj", "v_proj", "q_proj"],
            r"train\.lora\.target_modules: expected each entry once \(q_proj is listed twice\)",
        ),
    ],
)
def test_bad_values_name_the_key(raw, dotted, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.parse(_set(raw, dotted, value), "params.yaml")
    assert str(info.value).startswith("params.yaml: ")


def test_unknown_top_level_section(raw):
    data = copy.deepcopy(raw)
    data["optimizer"] = {}
    with pytest.raises(ConfigError, match=r"optimizer: unknown key"):
        config.parse(data)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        config.load(tmp_path / "nope.yaml")


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    evil = tmp_path / "params.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(evil)


def test_params_are_frozen():
    params = config.load(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        params.train.beta = 0.5  # type: ignore[misc]


def test_a_loss_type_trl_would_refuse_later_fails_at_load(tmp_path):
    """exo_pair needs label_smoothing > 0: trl 1.16 raises only inside DPOTrainer, after the models load."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["loss_type"] = "exo_pair"
    with pytest.raises(
        ConfigError, match=r"train\.label_smoothing: expected a number > 0 with train\.loss_type exo_pair"
    ):
        config.parse(data, "p.yaml")
    data["train"]["label_smoothing"] = 1.0e-3
    assert config.parse(data, "p.yaml").train.label_smoothing == 1.0e-3
    data["train"]["loss_type"] = "robust"
    data["train"]["label_smoothing"] = 0.5
    with pytest.raises(
        ConfigError,
        match=r"train\.label_smoothing: expected a number in \[0, 0\.5\) with train\.loss_type robust",
    ):
        config.parse(data, "p.yaml")


def test_a_key_given_twice_in_params_yaml_is_refused_naming_both_lines(tmp_path):
    """Plain YAML keeps the second `beta:` silently; a params file that says two things is refused."""
    text = (
        Path("params.yaml").read_text(encoding="utf-8").replace("  beta: 0.1", "  beta: 0.1\n  beta: 0.5", 1)
    )
    assert text.count("  beta: ") == 2
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    line = next(i for i, x in enumerate(text.splitlines(), 1) if x.startswith("  beta: 0.5"))
    with pytest.raises(
        ConfigError,
        match=rf"not valid YAML at line {line}, column 3: key 'beta' appears twice in one mapping \(first at line {line - 1}\)",
    ):
        config.load(path)
