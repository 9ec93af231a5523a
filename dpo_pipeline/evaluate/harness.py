"""lm-evaluation-harness scoring on a loaded model: the task suite with per-task few-shot counts, flat scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.tasks import task_manager

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import EvalParams, Params

# The metric each task is ranked by (lm-eval's "metric,filter" keys), as the Open LLM Leaderboard v1 read
# them: length-normalised accuracy where answers differ in length, strict-match for gsm8k.
PRIMARY_METRICS = {
    "arc_challenge": "acc_norm,none",
    "hellaswag": "acc_norm,none",
    "truthfulqa_mc2": "acc,none",
    "mmlu": "acc,none",
    "winogrande": "acc,none",
    "gsm8k": "exact_match,strict-match",
    "dpo_heldout_pref": "acc_norm,none",
    "chatml_format": "format_ok,none",
}


# For any other task: the first of these that the task reports.
FALLBACK_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def simple_evaluate_kwargs(e: EvalParams, seed: int) -> dict[str, Any]:
    """Everything simple_evaluate takes from params besides the model (loaded once, see load_eval_model; its
    batch size and device are the wrapper's) and the tasks."""
    return {
        "limit": e.limit or None,  # 0 = every document
        "random_seed": seed,
        "numpy_random_seed": seed,
        "torch_random_seed": seed,
        "fewshot_random_seed": seed,
        "log_samples": True,  # per-document results: the held-out tasks' paired tests and length figures
        "apply_chat_template": False,  # the offline tasks carry ChatML already; the v1 suite used none
    }


def primary_metric(task: str, metrics: dict[str, Any]) -> str:
    """The lm-eval metric key ("metric,filter") a task is ranked by."""
    wanted = PRIMARY_METRICS.get(task)
    if wanted is not None:
        if wanted not in metrics:
            raise StageError(
                f"lm-eval results for {task}: expected metric {wanted!r}, got {', '.join(sorted(metrics))}"
            )
        return wanted
    for key in FALLBACK_METRICS:
        if key in metrics:
            return key
    candidates = sorted(k for k in metrics if "," in k and "_stderr" not in k and _finite(metrics[k]))
    if not candidates:
        raise StageError(f"lm-eval results for {task}: no numeric metric found")
    return candidates[0]


def flat_key(task: str, lm_key: str) -> str:
    """ "acc_norm,none" -> "task/acc_norm"; "exact_match,strict-match" -> "task/exact_match/strict-match"."""
    metric, _, filt = lm_key.partition(",")
    return f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}/{filt}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _task_metrics(results: dict[str, Any], task: str) -> dict[str, Any]:
    for section in ("results", "groups"):
        if task in (results.get(section) or {}):
            return results[section][task]
    raise StageError(f"lm-eval returned no results for task {task!r}")


def flat_scores(results: dict[str, Any], task_names: list[str]) -> dict[str, float]:
    """lm-eval's results dict -> flat {"task/metric": value}.

    Every finite metric of every requested task is kept (stderrs as "task/metric_stderr"); sub-tasks of a
    group (mmlu's 57) are summarised by the group's own aggregate. Non-numeric or N/A values are left out.
    """
    scores: dict[str, float] = {}
    for task in task_names:
        for lm_key, value in _task_metrics(results, task).items():
            if "," in lm_key and _finite(value):
                scores[flat_key(task, lm_key)] = round(float(value), 6)
    return scores


def primary_keys(results: dict[str, Any], task_names: list[str]) -> dict[str, str]:
    return {t: flat_key(t, primary_metric(t, _task_metrics(results, t))) for t in task_names}


def settings_meta(params: Params, lm_eval_version: str) -> dict[str, Any]:
    """The scoring settings recorded with the scores (and compared between base and tuned)."""
    e = params.eval
    return {
        "lm_eval_version": lm_eval_version,
        "seed": params.seed,
        "batch_size": e.batch_size,
        "limit": e.limit,
        "dtype": e.dtype,
        "num_fewshot": {t.name: t.num_fewshot for t in e.tasks},
    }


def load_eval_model(model_dir: str | Path, e: EvalParams, tokenizer=None):
    """(model, tokenizer) from a local folder, loaded once per stage for scoring and samples: straight onto
    `eval.device` in `eval.dtype`, no remote code, never the hub. `tokenizer`: one already loaded from it."""
    from dpo_pipeline.models.loading import load_model, load_tokenizer, resolve_device, torch_dtype

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    device = resolve_device(e.device)
    model = load_model(model_dir, dtype=torch_dtype(e.dtype), device_map={"": device}).eval()
    return model, tokenizer


def lm_eval_model(model, tokenizer, e: EvalParams):
    """lm-eval's HF backend around an already loaded model; `eval.batch_size` may be lm-eval's "auto"."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size, trust_remote_code=False)


def run_lm_eval(
    model_dir: Path,
    params: Params,
    tasks_dir: Path,
    prepared_dir: Path,
    loaded: tuple | None = None,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """simple_evaluate with each task's own few-shot count, on `loaded` (model, tokenizer) or the folder;
    `names`: the eval.tasks to score (default all)."""
    e = params.eval
    names = [t.name for t in e.tasks] if names is None else names
    manager, local = task_manager(names, tasks_dir, prepared_dir)
    import lm_eval

    built: list[Any] = []
    for spec in (t for t in e.tasks if t.name in names):
        # simple_evaluate's num_fewshot is one number for all tasks; the suite needs one per task, so each
        # task is built here and its few-shot count set before it is handed over.
        task_set = manager.load([spec.name])
        for task in task_set["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
            if spec.name in local and task.config.output_type == "generate_until":
                # Our own generation tasks take their length from params (eval.task_max_new_tokens), not
                # from a number in their YAML; the registry's (gsm8k) keep the leaderboard's settings.
                task.set_config(
                    key="generation_kwargs", value={"max_gen_toks": e.task_max_new_tokens}, update=True
                )
        if spec.name in task_set["groups"]:
            built.append(task_set["groups"][spec.name])
        else:
            built.extend(task_set["tasks"].values())
    model, tokenizer = loaded if loaded is not None else load_eval_model(model_dir, e)
    results = lm_eval.simple_evaluate(
        model=lm_eval_model(model, tokenizer, e),
        tasks=built,
        task_manager=manager,
        **simple_evaluate_kwargs(e, params.seed),
    )
    if results is None:
        raise StageError("lm-eval returned no results (not the main process?)")
    return results
