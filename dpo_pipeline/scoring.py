"""lm-evaluation-harness scoring and seeded sample generations on a loaded model."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from dpo_pipeline.chatml import format_prompt
from dpo_pipeline.errors import StageError

# Set when every task lives in tasks/: nothing then needs the hub, so nothing may reach it.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# The tasks/ YAMLs whose documents are the pipeline's own held-out split (see tasks/heldout.py).
HELDOUT_DATASET = re.compile(r"^custom_dataset:\s*!function\s+heldout\.load_prepared_test\s*$", re.M)


# models/merged/pipeline_merge.json keys -> MLflow tags (the merge run sets the same ones).
LINEAGE_TAGS = {"adapter_hash": "lineage.adapter.hash", "train_run_id": "lineage.train_run_id"}


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


# The Open LLM Leaderboard v1 suite: when all six are scored, their mean is reported on its own as well
# ("open_llm_v1/average"), the figure the article compares, apart from the average over every task.
LEADERBOARD_V1 = ("arc_challenge", "hellaswag", "truthfulqa_mc2", "mmlu", "winogrande", "gsm8k")


# For any other task: the first of these that the task reports.
FALLBACK_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


# Settings that must be equal between eval_base.json and this run for base-vs-tuned deltas to mean anything.
COMPARABLE_META = ("lm_eval_version", "seed", "batch_size", "limit", "dtype", "num_fewshot")


def _task_yamls(tasks_dir: str | Path) -> dict[str, str]:
    """{task name: YAML text} for tasks/ (read with a regex: the YAMLs use lm-eval's !function tag)."""
    found = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        match = re.search(r"^task:\s*([\w.-]+)\s*$", text, re.M)
        if match:
            found[match.group(1)] = text
    return found


def local_task_names(tasks_dir: str | Path) -> set[str]:
    """Task names defined by the YAMLs in tasks/."""
    return set(_task_yamls(tasks_dir))


def heldout_task_names(tasks_dir: str | Path) -> set[str]:
    """The tasks/ tasks whose documents come from data/prepared (heldout.load_prepared_test)."""
    return {name for name, text in _task_yamls(tasks_dir).items() if HELDOUT_DATASET.search(text)}


def simple_evaluate_kwargs(e: Any, seed: int) -> dict[str, Any]:
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


def add_averages(
    scores: dict[str, float], primary: dict[str, str], source: str = "scores"
) -> dict[str, float]:
    """`scores` plus "average" of each task's primary metric (`primary`: task -> flat key), and
    "open_llm_v1/average" when the whole Open LLM Leaderboard v1 suite is among them."""
    missing = [key for key in primary.values() if key not in scores]
    if missing:
        raise StageError(f"{source}: no {', '.join(missing)} to average (scored with other tasks?)")
    out = dict(scores)
    if primary:
        values = [scores[key] for key in primary.values()]
        out["average"] = round(sum(values) / len(values), 6)
    if all(task in primary for task in LEADERBOARD_V1):
        suite = [scores[primary[task]] for task in LEADERBOARD_V1]
        out["open_llm_v1/average"] = round(sum(suite) / len(suite), 6)
    return out


def primary_keys(results: dict[str, Any], task_names: list[str]) -> dict[str, str]:
    return {t: flat_key(t, primary_metric(t, _task_metrics(results, t))) for t in task_names}


def compare_scores(tuned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Tuned values under their own keys, the base model's under `<key>_base`, and `<key>_delta`."""
    out: dict[str, float] = {}
    for key, value in tuned.items():
        out[key] = value
        if key in base:
            out[f"{key}_base"] = base[key]
            if not key.endswith("_stderr"):
                out[f"{key}_delta"] = round(value - base[key], 6)
    return out


def check_comparable(
    meta: dict[str, Any], base_meta: dict[str, Any], base_file: str | Path, stage: str = "evaluate_base"
) -> None:
    for key in COMPARABLE_META:
        if meta.get(key) != base_meta.get(key):
            raise StageError(
                f"{base_file}: meta.{key} is {base_meta.get(key)!r} but this run uses {meta.get(key)!r}; "
                f"the base scores were made with other settings (run `dvc repro {stage}`)"
            )


def settings_meta(params: Any, lm_eval_version: str) -> dict[str, Any]:
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


def generation_meta(params: Any) -> dict[str, Any]:
    e = params.eval
    return {
        "seed": params.seed,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
    }


def generation_kwargs(e: Any, tokenizer) -> dict[str, Any]:
    """Seeded nucleus sampling, exactly as params say (top_k off, so only temperature and top_p shape it)."""
    return {
        "do_sample": True,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "top_k": 0,
        "max_new_tokens": e.max_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }


def decode_answer(new_tokens: list[int], tokenizer) -> tuple[str, bool]:
    """The generated answer up to (not including) the first eos, and whether the turn ended there."""
    eos = tokenizer.eos_token_id
    ended = eos in new_tokens
    if ended:
        new_tokens = new_tokens[: new_tokens.index(eos)]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), ended


def load_eval_model(model_dir: str | Path, e: Any, tokenizer=None):
    """(model, tokenizer) from a local folder, loaded once per stage for scoring and samples: straight onto
    `eval.device` in `eval.dtype`, no remote code, never the hub. `tokenizer`: one already loaded from it."""
    from dpo_pipeline.models import load_model, load_tokenizer, resolve_device, torch_dtype

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    device = resolve_device(e.device)
    model = load_model(model_dir, dtype=torch_dtype(e.dtype), device_map={"": device}).eval()
    return model, tokenizer


def lm_eval_model(model, tokenizer, e: Any):
    """lm-eval's HF backend around an already loaded model; `eval.batch_size` may be lm-eval's "auto"."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size, trust_remote_code=False)


def task_manager(names: list[str], tasks_dir: str | Path, prepared_dir: str | Path) -> tuple[Any, set[str]]:
    """(lm-eval's TaskManager for the eval.tasks `names`, the names tasks/ defines). tasks/ is always indexed,
    lm-eval's own registry (hundreds of folders, ~15 s) only when a task needs it, and the offline switches
    are set when every task lives in tasks/. prepared_dir reaches tasks/heldout.py's custom_dataset through
    the task metadata. StageError names any task neither knows."""
    local = local_task_names(tasks_dir)
    all_local = all(name in local for name in names)
    if all_local:
        os.environ.update(OFFLINE_ENV)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(tasks_dir),
        include_defaults=not all_local,
        metadata={"prepared_dir": str(Path(prepared_dir).resolve())},
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise StageError(
            f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)} (not in {tasks_dir}/ nor lm-eval's registry)"
        )
    return manager, local


def run_lm_eval(
    model_dir: Path,
    params: Any,
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


def generate_samples(model_dir: Path, params: Any, loaded: tuple | None = None) -> list[dict[str, Any]]:
    """One seeded sampled answer per eval.sample_prompts entry (torch.manual_seed(seed) before each), from
    `loaded` (model, tokenizer) or the folder."""
    import torch

    e = params.eval
    model, tokenizer = loaded if loaded is not None else load_eval_model(model_dir, e)
    kwargs = generation_kwargs(e, tokenizer)
    samples = []
    for prompt in e.sample_prompts:
        text = format_prompt(prompt.system, prompt.question, tokenizer)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        torch.manual_seed(params.seed)
        with torch.no_grad():
            output = model.generate(**inputs, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        answer, ended = decode_answer(new_tokens, tokenizer)
        length = new_tokens.index(tokenizer.eos_token_id) if ended else len(new_tokens)
        samples.append(
            {
                "system": prompt.system,
                "question": prompt.question,
                "answer": answer,
                "ended_turn": ended,
                "length_tokens": length,
            }
        )
    return samples


def sample_figures(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Flat figures of the sample generations: the share that ended their turn, and their lengths in tokens."""
    from dpo_pipeline.stats import length_summary

    if not samples:
        return {}
    out = {"samples/ended_turn": round(sum(s["ended_turn"] for s in samples) / len(samples), 6)}
    for name, value in length_summary([s["length_tokens"] for s in samples]).items():
        out[f"samples/length_{name}_tokens"] = round(value, 6)
    return out


def heldout_documents(
    results: dict[str, Any], names: list[str], tasks_dir: str | Path, tokenizer
) -> dict[str, dict[str, Any]]:
    """Per-document results of the held-out tasks, sorted by row id: {task: {"ids", "metrics": {metric: [..]},
    "buckets" (multiple choice: which of chosen/rejected is longer), "lengths" (generation: answer tokens)}}.
    Kept for both models, so their deltas can be tested document by document."""
    from dpo_pipeline.stats import length_bucket

    heldout = heldout_task_names(tasks_dir)
    out: dict[str, dict[str, Any]] = {}
    for task in names:
        if task not in heldout:
            continue
        samples = sorted((results.get("samples") or {}).get(task, []), key=lambda s: str(s["doc"]["id"]))
        if not samples:
            raise StageError(f"lm-eval logged no per-document results for {task!r}")
        entry: dict[str, Any] = {"ids": [str(s["doc"]["id"]) for s in samples], "metrics": {}}
        for metric in samples[0]["metrics"]:
            values = [s.get(metric) for s in samples]
            if all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values):
                entry["metrics"][metric] = [float(v) for v in values]
        first = samples[0]["filtered_resps"][0]
        if isinstance(first, str):  # a generation task: the answers' lengths in tokens
            entry["lengths"] = [
                len(tokenizer(s["filtered_resps"][0], add_special_tokens=False)["input_ids"]) for s in samples
            ]
        else:
            entry["buckets"] = [length_bucket(s["doc"]["chosen"], s["doc"]["rejected"]) for s in samples]
        out[task] = entry
    return out


def document_figures(documents: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat figures from per-document results: each multiple-choice metric by length bucket (chosen answer
    longer / shorter, and their mean, the length-controlled figure); each generation task's answer lengths."""
    from dpo_pipeline.stats import bucket_accuracy, length_summary

    out: dict[str, float] = {}
    for task, entry in documents.items():
        if "buckets" in entry:
            for metric, values in entry["metrics"].items():
                for bucket, value in bucket_accuracy(values, entry["buckets"]).items():
                    out[f"{task}/{metric}_{bucket}"] = round(value, 6)
        for name, value in length_summary(entry.get("lengths", [])).items():
            out[f"{task}/length_{name}_tokens"] = round(value, 6)
    return out


def bucket_counts(documents: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    from collections import Counter

    return {
        task: dict(sorted(Counter(b or "same_length" for b in entry["buckets"]).items()))
        for task, entry in documents.items()
        if "buckets" in entry
    }


def add_uncertainty(
    scores: dict[str, float],
    primary: dict[str, str],
    tuned_docs: dict[str, dict[str, Any]],
    base_docs: dict[str, dict[str, Any]],
    level: float,
    source: str,
) -> tuple[dict[str, float], dict[str, str]]:
    """`scores` (compare_scores' output) plus, for every delta, `_delta_stderr`, `_p_value` and `_significant`
    (1.0 when p < `level`); returns them and how each task's deltas were tested.

    Held-out tasks are paired (their per-document results, the same row ids for both models: McNemar for 0/1
    metrics), their length buckets too; other tasks combine lm-eval's two standard errors; the averages
    combine their tasks' delta standard errors as independent."""
    from dpo_pipeline.stats import LENGTH_BUCKETS, independent, normal_p, paired

    out = dict(scores)
    methods: dict[str, str] = {}

    def put(key: str, figures: dict[str, float]) -> None:
        out[f"{key}_delta_stderr"] = round(figures["delta_stderr"], 6)
        out[f"{key}_p_value"] = round(figures["p_value"], 6)
        out[f"{key}_significant"] = 1.0 if figures["p_value"] < level else 0.0

    for task, entry in tuned_docs.items():
        other = base_docs.get(task)
        if other is None or other["ids"] != entry["ids"]:
            raise StageError(
                f"{source}: the base's per-document results for {task} are not of the same documents "
                f"({0 if other is None else len(other['ids'])} vs {len(entry['ids'])} rows; run `dvc repro "
                "evaluate_base_heldout`)"
            )
        methods[task] = f"paired over {len(entry['ids'])} documents (McNemar exact for 0/1 metrics)"
        key = f"{task}/length_mean_tokens"
        if "lengths" in entry and "lengths" in other and f"{key}_delta" in out:
            put(key, paired([float(x) for x in entry["lengths"]], [float(x) for x in other["lengths"]]))
        for metric, values in entry["metrics"].items():
            if metric not in other["metrics"]:
                continue
            key = f"{task}/{metric}"
            if f"{key}_delta" in out:
                put(key, paired(values, other["metrics"][metric]))
            for bucket in LENGTH_BUCKETS if "buckets" in entry else ():
                picked = [i for i, b in enumerate(entry["buckets"]) if b == bucket]
                if picked and f"{key}_{bucket}_delta" in out:
                    put(
                        f"{key}_{bucket}",
                        paired([values[i] for i in picked], [other["metrics"][metric][i] for i in picked]),
                    )
    for key in list(scores):
        if not key.endswith("_delta") or f"{key[: -len('_delta')]}_delta_stderr" in out:
            continue
        name = key[: -len("_delta")]
        task = name.split("/", 1)[0]
        se_t, se_b = scores.get(f"{name}_stderr"), scores.get(f"{name}_stderr_base")
        if se_t is not None and se_b is not None:
            put(name, independent(scores[key], se_t, se_b))
            methods.setdefault(task, "independent (lm-eval's standard errors combined)")
    for average, tasks in (("average", list(primary)), ("open_llm_v1/average", list(LEADERBOARD_V1))):
        keys = [primary.get(t) for t in tasks]
        if f"{average}_delta" not in out or not all(k and f"{k}_delta_stderr" in out for k in keys):
            continue
        se = math.sqrt(sum(out[f"{k}_delta_stderr"] ** 2 for k in keys)) / len(keys)
        delta = out[f"{average}_delta"]
        p = normal_p(delta / se) if se > 0 else (1.0 if delta == 0 else 0.0)
        put(average, {"delta_stderr": se, "p_value": p})
    return out, methods
