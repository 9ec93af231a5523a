"""params.yaml -> frozen dataclasses.

Reads: params.yaml (or any recipe file with the same schema).
Every key must be known, present and of the declared type; a problem raises ConfigError naming the file,
the dotted key and what was expected. Cross-field rules (positive learning rate, max_length above
max_prompt_length, a loss type trl knows, ...) are checked here too, so a bad file fails before any
expensive work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dpo_pipeline.params_trace import Traced

PARAMS_FILE = "params.yaml"
# A folder: when set, every process that loads params writes the dotted keys it read there (one JSON file per
# process, with its command line), so tests/e2e/test_dag.py can check each stage reads exactly what dvc.yaml
# declares. Unset (always, outside that test), load() returns the plain dataclasses.
TRACE_ENV = "DPO_PARAMS_TRACE"


class ConfigError(ValueError):
    """A params file that does not match the schema. The message names the file and the dotted key."""


@dataclass(frozen=True)
class TrackingParams:
    experiment: str
    on_unreachable: Literal["fail", "local"]
    register: Literal["clean", "always", "never"]
    system_metrics: bool
    system_metrics_interval_s: float


@dataclass(frozen=True)
class LaunchParams:
    reference_num_processes: int
    max_restarts: int
    master_port: int
    checkpoint_dir: str
    checkpoint_storage: Literal["local", "shared"]


@dataclass(frozen=True)
class BuiltinModelParams:
    corpus: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_learning_rate: float
    pretrain_max_length: int


@dataclass(frozen=True)
class BaseParams:
    source: Literal["builtin", "hub"]
    name: str
    revision: str
    trust_remote_code: bool
    builtin: BuiltinModelParams


# data.format's choices: auto, or one of dpo_pipeline/data/formats.py FORMATS (tests/unit/test_formats.py checks
# that the two lists agree).
DataFormat = Literal[
    "auto", "orca", "orca_original", "argilla_orca", "standard", "conversational", "ultrafeedback", "hh_rlhf"
]


@dataclass(frozen=True)
class DataFilters:
    drop_ties: bool
    min_chosen_score: float | None
    min_score_margin: float | None
    drop_flagged: list[str]
    swap_disagreeing: bool


@dataclass(frozen=True)
class DataSource:
    name: str
    path: str
    hub_name: str
    hub_revision: str
    hub_split: str
    format: DataFormat
    filters: DataFilters
    fraction: float
    max_rows: int


# The keys a data.sources entry may leave out: it then takes the data section's own value (SOURCE_DEFAULTS: ""
# for path / hub_name / hub_revision, which say where the rows come from and must be set for one of the two).
SOURCE_INHERITS = ("hub_split", "format", "filters", "fraction", "max_rows")
SOURCE_DEFAULTS = {"path": "", "hub_name": "", "hub_revision": ""}


@dataclass(frozen=True)
class DataParams:
    source: Literal["local", "hub", "mix"]
    path: str
    hub_name: str
    hub_revision: str
    hub_split: str
    format: DataFormat
    filters: DataFilters
    fraction: float
    max_rows: int
    sources: list[DataSource]
    test_fraction: float
    max_prompt_length: int
    max_length: int


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    bias: Literal["none", "all", "lora_only"]
    target_modules: list[str]


@dataclass(frozen=True)
class TrainParams:
    load_in_4bit: bool
    bnb_4bit_quant_type: Literal["nf4", "fp4"]
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"]
    bnb_4bit_use_double_quant: bool
    lora: LoraParams
    method: Literal["dpo", "simpo", "cpo", "orpo", "kto"]
    beta: float
    loss_type: str | list[str]
    loss_weights: list[float]
    label_smoothing: float
    ld_alpha: float | None
    use_weighting: bool
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
    f_alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    cpo_alpha: float
    desirable_weight: float
    undesirable_weight: float
    learning_rate: float
    lr_scheduler_type: str
    warmup_steps: int
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optim: str
    precision: Literal["fp32", "bf16", "fp16"]
    device: Literal["cpu", "cuda", "auto"]
    save_steps: int
    logging_steps: int
    eval_steps: int
    group_by_length: bool
    reference_batch_size: int
    precompute_ref: bool
    share_prompt: bool
    num_processes: int
    num_nodes: int
    distributed: Literal["ddp", "fsdp", "zero3"]
    pairs_seed: int
    eval_pairs: int


@dataclass(frozen=True)
class MergeParams:
    dtype: Literal["float16", "bfloat16", "float32"]
    device: Literal["cpu", "cuda", "auto"]
    fidelity_prompts: int
    fidelity_max_abs: float
    fidelity_mean_abs: float


@dataclass(frozen=True)
class EvalTask:
    name: str
    num_fewshot: int


@dataclass(frozen=True)
class SamplePrompt:
    system: str
    question: str


@dataclass(frozen=True)
class EvalParams:
    tasks: list[EvalTask]
    batch_size: int | Literal["auto"]
    limit: int
    device: Literal["cpu", "cuda"]
    dtype: Literal["float16", "bfloat16", "float32"]
    task_max_new_tokens: int
    max_new_tokens: int
    temperature: float
    top_p: float
    sample_prompts: list[SamplePrompt]


@dataclass(frozen=True)
class PublishedScore:
    task: str
    metric: str
    value: float
    num_fewshot: int
    source: str
    confirmed: bool


@dataclass(frozen=True)
class ReportParams:
    significance_level: float
    calibration_tolerance: float
    on_calibration_mismatch: Literal["warn", "fail"]
    min_heldout_pairs: int
    max_epochs: float
    published: list[PublishedScore]


@dataclass(frozen=True)
class DecontaminationParams:
    ngram: int
    common_rows: int
    drop: bool
    max_examples: int


@dataclass(frozen=True)
class Params:
    seed: int
    tracking: TrackingParams
    launch: LaunchParams
    base: BaseParams
    data: DataParams
    decontamination: DecontaminationParams
    train: TrainParams
    merge: MergeParams
    eval: EvalParams
    report: ReportParams

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data (for MLflow params and model cards)."""
        return dataclasses.asdict(getattr(self, name))


def loss_types(t: TrainParams) -> list[str]:
    """`train.loss_type` as trl's list (a single name is a list of one)."""
    return [t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type)


# ---------------------------------------------------------------------------------------------------------
# Generic strict conversion: dict -> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail(f"one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _convert(arm, value, key, source)
            except ConfigError as err:
                errors.append(err)
        raise fail(" or ".join(_type_name(a) for a in typing.get_args(tp)))
    if origin is list:
        if not isinstance(value, list):
            raise fail(_type_name(tp))
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("a mapping")
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (write floats with a dot, e.g. 5.0e-5)" if isinstance(value, str) else ""
            raise fail("a number" + hint)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(
            f"{source}: {dotted(unknown[0])}: unknown key (known keys here: {', '.join(names)})"
        )
    missing = [k for k in names if k not in data]
    if missing:
        raise ConfigError(
            f"{source}: {dotted(missing[0])}: missing key (expected {_type_name(hints[missing[0]])})"
        )
    return cls(**{k: _convert(hints[k], data[k], dotted(k), source) for k in names})


# ---------------------------------------------------------------------------------------------------------
# What the pinned trl / transformers / bitsandbytes accept: plain data, so loading params imports no ML library.
# tests/unit/test_trl_glue.py checks each table against the installed packages.

# DPOConfig.loss_type's choices in trl 1.16 (its help text and DPOTrainer's loss dispatch). A constant, not read
# from trl's help text at run time: a reworded help string must not break every params load.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# What trl 1.16 requires of `label_smoothing` per loss type (DPOTrainer.__init__): exo_pair raises at 0,
# robust warns outside [0, 0.5). Checked below, before any work.
LABEL_SMOOTHING_RULES = {
    "exo_pair": (
        lambda eps: eps > 0.0,
        "a number > 0 with train.loss_type exo_pair (the EXO paper uses 1.0e-3)",
    ),
    "robust": (lambda eps: 0.0 <= eps < 0.5, "a number in [0, 0.5) with train.loss_type robust"),
}

# train.method -> the trl trainer that runs it (trl 1.16) and whether it needs a reference model. simpo is
# CPOTrainer with loss_type "simpo" and cpo_alpha 0 (the SimPO paper: no NLL term); cpo is CPOTrainer's
# default sigmoid loss with its NLL (behaviour-cloning) term weighted by train.cpo_alpha.
METHODS = {
    "dpo": {"trainer": "trl.DPOTrainer", "reference": True},
    "simpo": {"trainer": "trl.experimental.cpo.CPOTrainer", "reference": False},
    "cpo": {"trainer": "trl.experimental.cpo.CPOTrainer", "reference": False},
    "orpo": {"trainer": "trl.experimental.orpo.ORPOTrainer", "reference": False},
    "kto": {"trainer": "trl.KTOTrainer", "reference": True},
}
SIMPO_CPO_ALPHA = 0.0  # what method simpo passes as CPOConfig.cpo_alpha (pure SimPO)

# DPO losses that read `label_smoothing` in trl 1.16's DPOTrainer._compute_loss; the others ignore it (cDPO,
# label smoothing of the sigmoid loss, was removed in trl's DPO refactor).
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
# DPO losses that accept a non-default f_divergence_type (DPOTrainer.__init__ refuses the rest).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# DPO losses that use_weighting (WPO) cannot weight in trl 1.16, and why: aot and aot_unpaired sort the batch
# (DPOTrainer.__init__ raises NotImplementedError); sft's per-pair loss is one expanded scalar, which the
# weighting multiplies in place (a RuntimeError at the first training step, seen on the small profile).
NO_WEIGHTING_LOSSES = {
    "aot": "it sorts the batch",
    "aot_unpaired": "it sorts the batch",
    "sft": "its per-pair loss is one expanded scalar that trl's weighting multiplies in place",
}

# Every method- or loss-specific train.* key: the value at which it does nothing (trl 1.16's own default, so a
# params file that leaves it there changes nothing), and who reads it: the methods, and for method dpo the loss
# types (None: any DPO loss). A value other than the inert one is refused unless the run's method/loss reads it.
# tests/unit/test_methods_config.py checks the inert values against the trl config classes and, from trl's
# _compute_loss source, which losses read label_smoothing and discopop_tau; tests/stage/test_loss_formulas.py
# checks by computing trl's loss with and without label_smoothing that exactly LABEL_SMOOTHING_LOSSES move.
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "loss_type": {"inert": "sigmoid", "methods": ("dpo",), "losses": None},
    "loss_weights": {"inert": [], "methods": ("dpo",), "losses": None},
    "label_smoothing": {"inert": 0.0, "methods": ("dpo", "cpo", "simpo"), "losses": LABEL_SMOOTHING_LOSSES},
    "ld_alpha": {"inert": None, "methods": ("dpo",), "losses": None},
    "use_weighting": {"inert": False, "methods": ("dpo",), "losses": None},
    "f_divergence_type": {"inert": "reverse_kl", "methods": ("dpo",), "losses": None},
    "f_alpha_divergence_coef": {"inert": 0.5, "methods": ("dpo",), "losses": None},
    "discopop_tau": {"inert": 0.05, "methods": ("dpo",), "losses": ("discopop",)},
    "simpo_gamma": {"inert": 0.5, "methods": ("simpo",), "losses": None},
    "cpo_alpha": {"inert": 1.0, "methods": ("cpo",), "losses": None},
    "desirable_weight": {"inert": 1.0, "methods": ("kto",), "losses": None},
    "undesirable_weight": {"inert": 1.0, "methods": ("kto",), "losses": None},
}


def unused_setting(t: TrainParams) -> str | None:
    """One line naming the first train.* key set away from its inert value that the run's method/loss does not
    read (METHOD_PARAMS), and who does read it; None when every set key takes effect."""
    losses = loss_types(t)
    for key, rule in METHOD_PARAMS.items():
        value = getattr(t, key)
        if value == rule["inert"] and type(value) is type(rule["inert"]):
            continue
        shown = f"train.{key}: {value!r}"
        if t.method not in rule["methods"]:
            users = ", ".join(rule["methods"])
            return f"{shown} has no effect with train.method {t.method} in trl 1.16; it is used by method {users}"
        if t.method == "dpo" and rule["losses"] is not None and not set(losses) & set(rule["losses"]):
            users = ", ".join(rule["losses"])
            others = [m for m in rule["methods"] if m != "dpo"]
            also = f" (and by method {', '.join(others)})" if others else ""
            return (
                f"{shown} has no effect with loss_type {', '.join(losses)} in trl 1.16; it is used by "
                f"{users}{also}"
            )
    if t.f_alpha_divergence_coef != METHOD_PARAMS["f_alpha_divergence_coef"]["inert"] and (
        t.f_divergence_type != "alpha_divergence"
    ):
        return (
            f"train.f_alpha_divergence_coef: {t.f_alpha_divergence_coef!r} has no effect with f_divergence_type "
            f"{t.f_divergence_type} in trl 1.16; it is used by f_divergence_type alpha_divergence"
        )
    return None


# transformers' OptimizerNames that build and step here with the pinned packages (torch, bitsandbytes: its
# optimizers step on CPU too). Left out: those needing a package constraints.txt does not pin (torch_xla,
# torch_npu, torchdistx, torchao, galore_torch, lomo_optim, grokadamw, schedulefree, apollo_torch, torch-optimi).
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "ademamix",
    "sgd",
    "adagrad",
    "rmsprop",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
)
# transformers' SchedulerType names that need nothing but warm-up and total steps. Left out: cosine_with_min_lr,
# cosine_warmup_with_min_lr and warmup_stable_decay (they need lr_scheduler_kwargs, which params do not carry),
# reduce_lr_on_plateau and greedy (they step on an eval metric; training evaluates only at its end).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


# ---------------------------------------------------------------------------------------------------------
# Cross-field rules

_SHA = re.compile(r"^[0-9a-f]{40}$")


def _check(p: Params, source: str) -> None:
    """Cross-field rules, section by section; the first broken one raises ConfigError naming file and key."""

    def fail(key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    for check in (_check_ranges, _check_sources, _check_eval_and_report, _check_train_options):
        check(p, fail)
    _check_method(p.train, fail, source)


def _check_ranges(p: Params, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """Every number within the range it can mean."""
    positive_ints = {
        "base.builtin.vocab_size": p.base.builtin.vocab_size,
        "train.reference_batch_size": p.train.reference_batch_size,
        "eval.task_max_new_tokens": p.eval.task_max_new_tokens,
        "base.builtin.hidden_size": p.base.builtin.hidden_size,
        "base.builtin.intermediate_size": p.base.builtin.intermediate_size,
        "base.builtin.max_position_embeddings": p.base.builtin.max_position_embeddings,
        "base.builtin.num_hidden_layers": p.base.builtin.num_hidden_layers,
        "base.builtin.num_attention_heads": p.base.builtin.num_attention_heads,
        "base.builtin.num_key_value_heads": p.base.builtin.num_key_value_heads,
        "base.builtin.pretrain_batch_size": p.base.builtin.pretrain_batch_size,
        "base.builtin.pretrain_max_length": p.base.builtin.pretrain_max_length,
        "data.max_prompt_length": p.data.max_prompt_length,
        "data.max_length": p.data.max_length,
        "train.lora.r": p.train.lora.r,
        "train.lora.alpha": p.train.lora.alpha,
        "train.max_steps": p.train.max_steps,
        "train.per_device_train_batch_size": p.train.per_device_train_batch_size,
        "train.gradient_accumulation_steps": p.train.gradient_accumulation_steps,
        "train.save_steps": p.train.save_steps,
        "train.logging_steps": p.train.logging_steps,
        "train.num_processes": p.train.num_processes,
        "train.num_nodes": p.train.num_nodes,
        "launch.reference_num_processes": p.launch.reference_num_processes,
        "launch.master_port": p.launch.master_port,
        "merge.fidelity_prompts": p.merge.fidelity_prompts,
        **({"eval.batch_size": p.eval.batch_size} if p.eval.batch_size != "auto" else {}),
        "eval.max_new_tokens": p.eval.max_new_tokens,
        "decontamination.ngram": p.decontamination.ngram,
        "decontamination.common_rows": p.decontamination.common_rows,
    }
    for key, value in positive_ints.items():
        if value <= 0:
            raise fail(key, "an integer > 0", value)
    for key, value in {
        "seed": p.seed,
        "base.builtin.pretrain_steps": p.base.builtin.pretrain_steps,
        "train.warmup_steps": p.train.warmup_steps,
        "train.pairs_seed": p.train.pairs_seed,
        "train.eval_pairs": p.train.eval_pairs,
        "launch.max_restarts": p.launch.max_restarts,
        "eval.limit": p.eval.limit,
        "decontamination.max_examples": p.decontamination.max_examples,
    }.items():
        if value < 0:
            raise fail(key, "an integer >= 0", value)
    for key, value in {
        "base.builtin.pretrain_learning_rate": p.base.builtin.pretrain_learning_rate,
        "train.learning_rate": p.train.learning_rate,
        "train.beta": p.train.beta,
        "eval.temperature": p.eval.temperature,
    }.items():
        if not (value > 0 and math.isfinite(value)):
            raise fail(key, "a finite number > 0", value)
    if not (p.tracking.system_metrics_interval_s > 0 and math.isfinite(p.tracking.system_metrics_interval_s)):
        raise fail(
            "tracking.system_metrics_interval_s",
            "a finite number of seconds > 0",
            p.tracking.system_metrics_interval_s,
        )
    if p.launch.master_port > 65535:
        raise fail("launch.master_port", "a TCP port (1-65535)", p.launch.master_port)
    if not p.launch.checkpoint_dir.strip():
        raise fail(
            "launch.checkpoint_dir", "a folder for the train stage's checkpoints", p.launch.checkpoint_dir
        )
    if not p.tracking.experiment.strip():
        raise fail("tracking.experiment", "a non-empty MLflow experiment name", p.tracking.experiment)
    if not 0.0 < p.data.test_fraction < 1.0:
        raise fail("data.test_fraction", "a number strictly between 0 and 1", p.data.test_fraction)
    if not 0.0 <= p.train.lora.dropout < 1.0:
        raise fail("train.lora.dropout", "a number in [0, 1)", p.train.lora.dropout)
    if not 0.0 < p.eval.top_p <= 1.0:
        raise fail("eval.top_p", "a number in (0, 1]", p.eval.top_p)
    for key in ("merge.fidelity_max_abs", "merge.fidelity_mean_abs"):
        value = getattr(p.merge, key.split(".")[1])
        if not (value > 0 and math.isfinite(value)):  # .inf would switch the fidelity gate off
            raise fail(key, "a finite number > 0", value)


def _check_sources(p: Params, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """Where the base and the data come from, and the shapes they must have."""
    if p.data.max_length <= p.data.max_prompt_length:
        raise fail(
            "data.max_length",
            f"an integer greater than data.max_prompt_length ({p.data.max_prompt_length})",
            p.data.max_length,
        )
    if p.base.source == "builtin" and p.base.builtin.max_position_embeddings < p.data.max_length:
        raise fail(
            "base.builtin.max_position_embeddings",
            f"at least data.max_length ({p.data.max_length}): the model cannot attend over longer rows",
            p.base.builtin.max_position_embeddings,
        )
    if p.base.builtin.hidden_size % p.base.builtin.num_attention_heads:
        raise fail(
            "base.builtin.hidden_size", "a multiple of num_attention_heads", p.base.builtin.hidden_size
        )
    if p.base.builtin.num_attention_heads % p.base.builtin.num_key_value_heads:
        raise fail(
            "base.builtin.num_key_value_heads",
            "a divisor of num_attention_heads",
            p.base.builtin.num_key_value_heads,
        )
    if p.base.source == "hub":
        if not p.base.name:
            raise fail("base.name", "a hub repo id when base.source is hub", p.base.name)
        if not _SHA.match(p.base.revision):
            raise fail("base.revision", "a 40-hex commit sha when base.source is hub", p.base.revision)
    if p.base.trust_remote_code and not _SHA.match(p.base.revision):
        raise fail("base.trust_remote_code", "false unless base.revision pins a 40-hex commit sha", True)
    if p.data.source == "local" and not p.data.path.strip():
        raise fail(
            "data.path",
            "the raw data file (.jsonl, .json or .parquet) when data.source is local",
            p.data.path,
        )
    if p.data.source == "hub" and not _SHA.match(p.data.hub_revision):
        raise fail("data.hub_revision", "a 40-hex commit sha when data.source is hub", p.data.hub_revision)
    _check_data_sources(p.data, fail)


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_filters(filters: DataFilters, key: str, fail: Callable[[str, str, Any], ConfigError]) -> None:
    for name in ("min_chosen_score", "min_score_margin"):
        value = getattr(filters, name)
        if value is not None and not math.isfinite(value):
            raise fail(f"{key}.{name}", "a finite number, or null for no limit", value)
    for index, column in enumerate(filters.drop_flagged):
        if not column.strip():
            raise fail(f"{key}.drop_flagged[{index}]", "the name of a boolean column", column)


def _check_share(
    fraction: float, max_rows: int, key: str, fail: Callable[[str, str, Any], ConfigError]
) -> None:
    if not 0.0 < fraction <= 1.0:
        raise fail(
            f"{key}.fraction", "a number in (0, 1]: the share of the rows kept after the filters", fraction
        )
    if max_rows < 0:
        raise fail(f"{key}.max_rows", "an integer >= 0 (0 = every row)", max_rows)


def _check_data_sources(d: DataParams, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """data.sources: used with data.source mix only, each entry named once and reading from one place."""
    _check_filters(d.filters, "data.filters", fail)
    _check_share(d.fraction, d.max_rows, "data", fail)
    if d.source != "mix":
        if d.sources:
            raise fail(
                "data.sources",
                f"[] when data.source is {d.source} (a mixture is data.source: mix)",
                [s.name for s in d.sources],
            )
        return
    if not d.sources:
        raise fail("data.sources", "at least one source when data.source is mix", [])
    if not d.path.strip():
        raise fail(
            "data.path", "the folder holding the mixture's local files when data.source is mix", d.path
        )
    folder = Path(d.path)
    seen: set[str] = set()
    for index, s in enumerate(d.sources):
        key = f"data.sources[{index}]"
        if not _SOURCE_NAME.match(s.name) or s.name in seen:
            raise fail(f"{key}.name", "a unique name of letters, digits, '_', '.' or '-'", s.name)
        seen.add(s.name)
        if bool(s.path.strip()) == bool(s.hub_name.strip()):
            raise fail(key, "exactly one of path (a local file) or hub_name (a hub dataset)", s.name)
        if s.path and folder not in Path(s.path).parents:
            raise fail(
                f"{key}.path",
                f"a file inside data.path ({d.path}): that folder is the prepare stage's DVC dep, so a file "
                "outside it could change without DVC noticing",
                s.path,
            )
        if s.hub_name and not _SHA.match(s.hub_revision):
            raise fail(f"{key}.hub_revision", "a 40-hex commit sha for a hub source", s.hub_revision)
        _check_filters(s.filters, f"{key}.filters", fail)
        _check_share(s.fraction, s.max_rows, key, fail)


def _check_eval_and_report(p: Params, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """Targets, tasks and the report's published figures."""
    if not p.train.lora.target_modules:
        raise fail("train.lora.target_modules", "a non-empty list of module names", [])
    if not p.eval.tasks:
        raise fail("eval.tasks", "a non-empty list of tasks", [])
    for key, names in (
        ("train.lora.target_modules", list(p.train.lora.target_modules)),
        ("eval.tasks", [t.name for t in p.eval.tasks]),
        ("eval.sample_prompts", [(s.system, s.question) for s in p.eval.sample_prompts]),
    ):
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:
            raise fail(key, f"each entry once ({', '.join(twice)} is listed twice)", names)
    for i, task in enumerate(p.eval.tasks):
        if task.num_fewshot < 0:
            raise fail(f"eval.tasks[{i}].num_fewshot", "an integer >= 0", task.num_fewshot)
    r = p.report
    if not (math.isfinite(r.significance_level) and 0.0 < r.significance_level < 1.0):
        raise fail("report.significance_level", "a number strictly between 0 and 1", r.significance_level)
    if not (math.isfinite(r.calibration_tolerance) and r.calibration_tolerance >= 0.0):
        raise fail("report.calibration_tolerance", "a finite number >= 0", r.calibration_tolerance)
    if p.train.eval_steps < 0:
        raise fail(
            "train.eval_steps", "an integer >= 0 (0 = held-out metrics at the end only)", p.train.eval_steps
        )
    if r.min_heldout_pairs < 0:
        raise fail("report.min_heldout_pairs", "an integer >= 0 (0 = no minimum)", r.min_heldout_pairs)
    if not (math.isfinite(r.max_epochs) and r.max_epochs > 0.0):
        raise fail("report.max_epochs", "a finite number > 0", r.max_epochs)
    scored = {t.name for t in p.eval.tasks}
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(r.published):
        key = f"report.published[{i}]"
        if item.task not in scored:
            raise fail(f"{key}.task", f"one of eval.tasks ({', '.join(sorted(scored))})", item.task)
        if not (math.isfinite(item.value) and 0.0 <= item.value <= 1.0):
            raise fail(f"{key}.value", "a fraction in [0, 1], lm-eval's scale (64.93% is 0.6493)", item.value)
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", item.metric):
            raise fail(f"{key}.metric", "an lm-eval metric name such as acc_norm", item.metric)
        if item.num_fewshot < 0:
            raise fail(f"{key}.num_fewshot", "an integer >= 0", item.num_fewshot)
        if not item.source.strip():
            raise fail(f"{key}.source", "where the figure comes from (a URL or citation)", item.source)
        if (item.task, item.metric) in seen:
            raise fail(
                f"{key}",
                f"one figure per task and metric ({item.task}/{item.metric} is stated twice)",
                item.value,
            )
        seen.add((item.task, item.metric))


def _check_train_options(p: Params, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """The schedule training can follow, and the trl/transformers names it passes on (the tables above)."""
    if p.train.warmup_steps >= p.train.max_steps:
        raise fail(
            "train.warmup_steps",
            f"fewer than train.max_steps ({p.train.max_steps}): a longer warm-up ends training before the "
            "learning rate reaches train.learning_rate",
            p.train.warmup_steps,
        )
    for key, value in (
        ("train.learning_rate", p.train.learning_rate),
        ("base.builtin.pretrain_learning_rate", p.base.builtin.pretrain_learning_rate),
    ):
        if value > 1.0:
            raise fail(key, "a learning rate <= 1 (e.g. 5.0e-5)", value)
    if p.train.optim not in OPTIMIZERS:
        raise fail(
            "train.optim",
            f"a transformers optimizer this install can run ({', '.join(OPTIMIZERS)})",
            p.train.optim,
        )
    if p.train.lr_scheduler_type not in LR_SCHEDULERS:
        raise fail(
            "train.lr_scheduler_type",
            f"a transformers scheduler needing no extra arguments ({', '.join(LR_SCHEDULERS)})",
            p.train.lr_scheduler_type,
        )
    _check_distributed(p.train, fail)


# train.distributed: how the processes hold the model. ddp: a whole copy each (the 4-bit base fits one GPU);
# fsdp / zero3: the 4-bit base and the LoRA weights sharded across the processes through accelerate's FSDP2 or
# DeepSpeed ZeRO-3 (configs/accelerate/), after peft's FSDP+QLoRA and DeepSpeed+QLoRA guides.
SHARDED = ("fsdp", "zero3")


def _check_distributed(t: TrainParams, fail: Callable[[str, str, Any], ConfigError]) -> None:
    """Sharding combinations that cannot work; each refused with the reason."""
    if t.distributed not in SHARDED:
        return
    if t.device == "cpu":
        raise fail(
            "train.distributed",
            "ddp with train.device cpu (accelerate enables FSDP and DeepSpeed only on accelerators)",
            t.distributed,
        )
    if "8bit" in t.optim or t.optim.startswith("paged_"):
        raise fail(
            "train.optim",
            f"a torch optimizer with train.distributed {t.distributed} (bitsandbytes' paged and 8-bit optimizers "
            "keep their state outside the sharded parameters; peft's FSDP+QLoRA and ZeRO-3+QLoRA guides use "
            "adamw_torch)",
            t.optim,
        )


def _check_method(t: TrainParams, fail: Callable[[str, str, Any], ConfigError], source: str) -> None:
    """The method, its losses and their own settings: each a value trl takes, none without effect."""
    losses = loss_types(t)
    for loss in losses:
        if loss not in DPO_LOSS_TYPES:
            raise fail("train.loss_type", f"a trl DPO loss type ({', '.join(DPO_LOSS_TYPES)})", t.loss_type)
    if not losses or len(set(losses)) != len(losses):
        raise fail("train.loss_type", "a DPO loss type or a list of distinct ones", t.loss_type)
    if t.loss_weights and len(t.loss_weights) != len(losses):
        raise fail(
            "train.loss_weights",
            f"one weight per train.loss_type entry ({len(losses)}), or [] for 1.0 each",
            t.loss_weights,
        )
    for i, weight in enumerate(t.loss_weights):
        if not (math.isfinite(weight) and weight >= 0.0):
            raise fail(f"train.loss_weights[{i}]", "a finite number >= 0", weight)
    if t.loss_weights and not any(t.loss_weights):
        raise fail("train.loss_weights", "at least one weight > 0 (all zero trains nothing)", t.loss_weights)
    if not 0.0 <= t.label_smoothing <= 0.5:
        raise fail("train.label_smoothing", "a number in [0, 0.5]", t.label_smoothing)
    if t.ld_alpha is not None and not 0.0 <= t.ld_alpha <= 1.0:
        raise fail("train.ld_alpha", "null (off) or a number in [0, 1]", t.ld_alpha)
    for key in ("discopop_tau", "desirable_weight", "undesirable_weight"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value > 0.0):
            raise fail(f"train.{key}", "a finite number > 0", value)
    for key in ("simpo_gamma", "cpo_alpha", "f_alpha_divergence_coef"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value >= 0.0):
            raise fail(f"train.{key}", "a finite number >= 0", value)
    problem = unused_setting(t)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    if t.method == "dpo":
        for loss in losses:
            rule = LABEL_SMOOTHING_RULES.get(loss)
            if rule and not rule[0](t.label_smoothing):
                raise fail("train.label_smoothing", rule[1], t.label_smoothing)
        outside = [loss for loss in losses if loss not in F_DIVERGENCE_LOSSES]
        if t.f_divergence_type != "reverse_kl" and outside:
            raise fail(
                "train.f_divergence_type",
                f"reverse_kl with loss_type {', '.join(outside)} (trl 1.16 takes another f-divergence only with "
                f"{', '.join(F_DIVERGENCE_LOSSES)})",
                t.f_divergence_type,
            )
        unweighted = [loss for loss in losses if loss in NO_WEIGHTING_LOSSES]
        if t.use_weighting and unweighted:
            why = "; ".join(f"{loss}: {NO_WEIGHTING_LOSSES[loss]}" for loss in unweighted)
            raise fail(
                "train.use_weighting",
                f"false with loss_type {', '.join(unweighted)} (trl 1.16 fails: {why})",
                True,
            )
    if t.method == "kto" and t.per_device_train_batch_size < 2:
        raise fail(
            "train.per_device_train_batch_size",
            "at least 2 with method kto (its KL term pairs each prompt with another row's completion in the batch)",
            t.per_device_train_batch_size,
        )


# ---------------------------------------------------------------------------------------------------------


def parse(data: Any, source: str = PARAMS_FILE) -> Params:
    """Validate already-loaded YAML data. Raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    params = _build(Params, _inherit_sources(data, source), "", source)
    _check(params, source)
    return params


def _inherit_sources(data: dict[str, Any], source: str) -> dict[str, Any]:
    """data.sources entries with the keys they leave out filled in (SOURCE_INHERITS from the data section,
    SOURCE_DEFAULTS for where the rows come from). The input is not changed."""
    section = data.get("data")
    if not isinstance(section, dict) or not isinstance(section.get("sources"), list):
        return data
    entries = []
    for index, entry in enumerate(section["sources"]):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{source}: data.sources[{index}]: expected a mapping (name, path or hub_name, ...), "
                f"got {entry!r} ({type(entry).__name__})"
            )
        inherited = {k: section[k] for k in SOURCE_INHERITS if k in section and k not in entry}
        entries.append({**SOURCE_DEFAULTS, **inherited, **entry})
    return {**data, "data": {**section, "sources": entries}}


def sources(data: DataParams) -> list[DataSource]:
    """The sources a run reads: data.sources with data.source mix, else the one the data section names (its name
    the file's stem, or the hub dataset's name)."""
    listed = list(data.sources)  # [] unless data.source is mix (_check_data_sources)
    if data.source == "mix":
        return listed
    local = data.source == "local"
    return [
        DataSource(
            name=Path(data.path).stem if local else data.hub_name.rsplit("/", 1)[-1],
            path=data.path if local else "",
            hub_name="" if local else data.hub_name,
            hub_revision="" if local else data.hub_revision,
            hub_split=data.hub_split,
            format=data.format,
            filters=data.filters,
            fraction=data.fraction,
            max_rows=data.max_rows,
        )
    ]


def _traced(params: Params, folder: str) -> Any:
    import atexit
    import json
    import os
    import sys

    reads: set[str] = set()

    def write() -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        record = {"argv": sys.argv, "cwd": os.getcwd(), "reads": sorted(reads)}
        (Path(folder) / f"{os.getpid()}.json").write_text(json.dumps(record), encoding="utf-8")

    atexit.register(write)
    return Traced(params, "", reads)


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Load and validate a params file (safe YAML loader only). Raises ConfigError.

    With TRACE_ENV set, the result is a Traced view of the Params that records which keys are read."""
    params = _load(path)
    folder = os.environ.get(TRACE_ENV)
    return _traced(params, folder) if folder else params


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one silently,
    so a second `beta:` further down a section would quietly win over the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (first at line {first.line + 1}); "
                    "expected each key once",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _load(path: str | Path) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:  # one line: where it broke, what was expected, where the block began
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        began = getattr(err, "context_mark", None)
        opened = (
            f" ({context} at line {began.line + 1}, column {began.column + 1})" if context and began else ""
        )
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}{opened}") from err
    return parse(data, str(path))
