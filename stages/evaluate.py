"""evaluate stages: lm-eval scores and seeded sample generations, for the base or the merged (tuned) model.

Three DVC stages run this module (`python -m stages.evaluate <stage>`), so that each score is remade only when
what it reads changes:
  evaluate_base          the base model on the tasks that read no pipeline data (the benchmarks: the 7B
                         recipe's Open LLM Leaderboard v1 suite) and the sample generations. Reads models/base/
                         and params `seed`, `eval`; never data/prepared, so a data edit does not re-score the
                         base on the suite (about an hour of GPU time for the recipe).
                         Writes metrics/eval_base.json, metrics/samples_base.json.
  evaluate_base_heldout  the base model on the tasks that read data/prepared/test.parquet (tasks/ YAMLs whose
                         dataset is heldout.load_prepared_test: the held-out preference and ChatML-format
                         tasks). Reads models/base/, data/prepared/, params `seed` and the scoring keys of
                         `eval`; a data edit re-runs this stage only, among the base's.
                         Writes metrics/eval_base_heldout.json.
  evaluate               the merged model on every task, plus samples; puts the base's figures from the two
                         files above next to its own (`_base`, `_delta`) after checking they were made with the
                         same settings. Writes metrics/eval.json (flat keys per task/metric, plus the average of
                         each task's primary metric, tuned and base), metrics/samples.json.
Each scores file carries a nested `meta` (lm-eval version, seed, batch size, limit, few-shot counts, primary
metric per task, chat template hash) that `dvc metrics diff` shows as plain values.

Scoring goes through lm-evaluation-harness's Python API (`simple_evaluate`, HF backend around the model loaded
once per stage, a TaskManager that also indexes tasks/). Task names are resolved by lm-eval's registry, so the
7B recipe's suite (arc_challenge 25-shot, hellaswag 10, truthfulqa_mc2 0, mmlu 5, winogrande 5, gsm8k 5) runs
through the same code path; those tasks need the hub's datasets, so the offline switches are only set when
every task lives in tasks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
from pathlib import Path
from typing import Any

from stages.common import (
    BASE_DIR,
    MERGED_DIR,
    METRICS_DIR,
    PREPARED_DIR,
    StageError,
    read_json,
    require_safetensors,
    template_hash,
    write_json,
)

TASKS_DIR = Path("tasks")
# Set when every task lives in tasks/: nothing then needs the hub, so nothing may reach it.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclasses.dataclass(frozen=True)
class Part:
    """What one evaluate stage scores and writes (dvc.yaml names the same stage names and paths)."""

    model: str  # "base" (models/base) or "merged" (models/merged)
    tasks: str  # "benchmarks": tasks that read no pipeline data; "heldout": those that do; "all"
    scores_file: str
    samples_file: str | None  # None: no sample generations in this stage
    sections: tuple[str, ...]  # the params the stage declares (and logs)


# The scoring settings of `eval` (the held-out stage makes no samples, so the generation keys are not its).
SCORING_SECTIONS = ("seed", "eval.tasks", "eval.batch_size", "eval.limit", "eval.device", "eval.dtype")
PARTS = {
    "evaluate_base": Part("base", "benchmarks", "eval_base.json", "samples_base.json", ("seed", "eval")),
    "evaluate_base_heldout": Part("base", "heldout", "eval_base_heldout.json", None, SCORING_SECTIONS),
    "evaluate": Part("merged", "all", "eval.json", "samples.json", ("seed", "eval")),
}
BASE_PARTS = ("evaluate_base", "evaluate_base_heldout")
# The tasks/ YAMLs whose documents are the pipeline's own held-out split (see tasks/heldout.py).
HELDOUT_DATASET = re.compile(r"^custom_dataset:\s*!function\s+heldout\.load_prepared_test\s*$", re.M)
# models/merged/pipeline_merge.json keys -> MLflow tags (the merge run sets the same ones).
LINEAGE_TAGS = {"adapter_sha256": "lineage.adapter.sha256", "train_run_id": "lineage.train_run_id"}

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


# ---------------------------------------------------------------------------------------------------------
# Pure builders


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


def part_tasks(part: Part, task_names: list[str], tasks_dir: str | Path) -> list[str]:
    """The eval.tasks names one stage scores, in params order."""
    if part.tasks == "all":
        return list(task_names)
    heldout = heldout_task_names(tasks_dir)
    return [n for n in task_names if (n in heldout) == (part.tasks == "heldout")]


def simple_evaluate_kwargs(e: Any, seed: int) -> dict[str, Any]:
    """Everything simple_evaluate takes from params besides the model (loaded once, see load_eval_model; its
    batch size and device are the wrapper's) and the tasks."""
    return {
        "limit": e.limit or None,  # 0 = every document
        "random_seed": seed,
        "numpy_random_seed": seed,
        "torch_random_seed": seed,
        "fewshot_random_seed": seed,
        "log_samples": False,
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


def format_prompt(system: str, question: str, tokenizer) -> str:
    """ChatML prompt as the prepare stage builds it: a system turn only when the system text is non-empty."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


# ---------------------------------------------------------------------------------------------------------
# Side effects


def load_eval_model(model_dir: str | Path, e: Any, tokenizer=None):
    """(model, tokenizer) from a local folder, loaded once per stage for scoring and samples: straight onto
    `eval.device` in `eval.dtype`, no remote code, never the hub. `tokenizer`: one already loaded from it."""
    from stages.common import load_model, load_tokenizer, resolve_device, torch_dtype

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    device = resolve_device(e.device)
    model = load_model(model_dir, dtype=torch_dtype(e.dtype), device_map={"": device}).eval()
    return model, tokenizer


def lm_eval_model(model, tokenizer, e: Any):
    """lm-eval's HF backend around an already loaded model; `eval.batch_size` may be lm-eval's "auto"."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size, trust_remote_code=False)


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
    all_local = all(name in local_task_names(tasks_dir) for name in names)
    if all_local:
        os.environ.update(OFFLINE_ENV)
    import lm_eval
    from lm_eval.tasks import TaskManager

    # prepared_dir reaches tasks/heldout.py's custom_dataset through the task metadata. lm-eval's own
    # registry (hundreds of folders, ~15 s to index) is only scanned when a task needs it.
    manager = TaskManager(
        include_path=str(tasks_dir),
        include_defaults=not all_local,
        metadata={"prepared_dir": str(prepared_dir.resolve())},
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise StageError(
            f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)} (not in {tasks_dir}/ nor lm-eval's registry)"
        )
    built: list[Any] = []
    for spec in (t for t in e.tasks if t.name in names):
        # simple_evaluate's num_fewshot is one number for all tasks; the suite needs one per task, so each
        # task is built here and its few-shot count set before it is handed over.
        task_set = manager.load([spec.name])
        for task in task_set["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
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
        samples.append(
            {"system": prompt.system, "question": prompt.question, "answer": answer, "ended_turn": ended}
        )
    return samples


def read_base_scores(
    meta: dict[str, Any], metrics_dir: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """(base scores of every task, base samples, the files read) from the two base stages' files, each checked
    to hold scores made with this run's settings. Checked before any scoring."""
    scores: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for stage in BASE_PARTS:
        part = PARTS[stage]
        for name in filter(None, (part.scores_file, part.samples_file)):
            path = metrics_dir / name
            if not path.is_file():
                raise StageError(f"{path}: base model results not found (run `dvc repro {stage}` first)")
        path = metrics_dir / part.scores_file
        found = read_json(path)
        check_comparable(meta, found.get("meta", {}), path, stage)
        scores.update({k: v for k, v in found.items() if k != "meta"})
        files[stage] = path
    samples = read_json(metrics_dir / PARTS["evaluate_base"].samples_file)
    base_meta = read_json(files["evaluate_base"]).get("meta", {})
    scores["meta"] = base_meta
    return scores, samples, files


def run(
    params: Any,
    stage: str,
    model_dir: str | Path,
    prepared_dir: str | Path = PREPARED_DIR,
    tasks_dir: str | Path = TASKS_DIR,
    metrics_dir: str | Path = METRICS_DIR,
) -> dict[str, Any]:
    """Run one evaluate stage (a PARTS key) on the model in `model_dir` and write its files; returns the
    scores. `prepared_dir` is only read by stages that score held-out tasks."""
    from importlib import metadata

    from stages import tracking
    from stages.common import load_tokenizer

    if stage not in PARTS:
        raise StageError(f"evaluate stage: expected one of {', '.join(PARTS)}, got {stage!r}")
    part = PARTS[stage]
    model_dir, prepared_dir, tasks_dir, metrics_dir = map(
        Path, (model_dir, prepared_dir, tasks_dir, metrics_dir)
    )
    require_safetensors(model_dir)
    e = params.eval
    names = part_tasks(part, [t.name for t in e.tasks], tasks_dir)
    reads_data = bool(set(names) & heldout_task_names(tasks_dir))
    if reads_data:
        test_file = prepared_dir / "test.parquet"
        if not test_file.is_file():
            raise StageError(f"{test_file}: held-out test split not found (run the prepare stage first)")
    meta = settings_meta(params, metadata.version("lm_eval"))
    base_scores: dict[str, Any] | None = None
    base_samples: dict[str, Any] | None = None
    base_files: dict[str, Path] = {}
    if part.model == "merged":
        # Checked before any scoring: deltas against base scores made with other settings mean nothing.
        base_scores, base_samples, base_files = read_base_scores(meta, metrics_dir)

    tokenizer = load_tokenizer(model_dir)
    lineage = _lineage(model_dir)
    # Named as the producing stage names its output, so input.<name>.sha256 here equals its output tag.
    inputs: dict[str, Path] = {part.model: model_dir, "tasks": tasks_dir}
    if reads_data:
        inputs["prepared"] = prepared_dir
    inputs.update({f"{Path(path).stem}": path for path in base_files.values()})
    with tracking.stage_run(
        stage,
        params,
        sections=list(part.sections),
        inputs=inputs,
        tags={"eval.model": part.model, **{LINEAGE_TAGS[k]: str(v) for k, v in lineage.items()}},
    ):
        loaded = load_eval_model(model_dir, e, tokenizer)  # once, for scoring and samples
        results = run_lm_eval(model_dir, params, tasks_dir, prepared_dir, loaded, names) if names else {}
        scores = flat_scores(results, names)
        primary = primary_keys(results, names)
        samples = generate_samples(model_dir, params, loaded) if part.samples_file else []
        del loaded
        gc.collect()
        if samples:  # share of sample answers that ended their turn with <|im_end|> within max_new_tokens
            scores["samples/ended_turn"] = round(sum(s["ended_turn"] for s in samples) / len(samples), 6)
        meta.update(
            {
                "model": part.model,
                "tasks": names,
                "primary_metric": primary,
                # documents scored per task (groups such as mmlu are counted per sub-task by lm-eval)
                "n_samples": {
                    t: int(n["effective"]) for t, n in results.get("n-samples", {}).items() if t in names
                },
                "chat_template_sha": template_hash(tokenizer.chat_template),
                **{k: str(v) for k, v in lineage.items()},
            }
        )
        samples_out: dict[str, Any] = {
            "model": part.model,
            "generation": generation_meta(params),
            "samples": samples,
        }
        if base_scores is not None and base_samples is not None:
            # The averages over every task, tuned and base alike (each base file holds only its own tasks).
            scores = add_averages(scores, primary, stage)
            base_only = {k: v for k, v in base_scores.items() if k != "meta"}
            base_only = add_averages(base_only, primary, " + ".join(map(str, base_files.values())))
            meta["chat_template_sha_base"] = base_scores["meta"].get("chat_template_sha", "")
            scores = compare_scores(scores, base_only)
            samples_out["base_samples"] = base_samples.get("samples", [])
        tracking.log_metrics(scores)
        tracking.set_tags({"chat_template_sha": meta["chat_template_sha"]})
        scores_file = metrics_dir / part.scores_file
        write_json(scores_file, {**scores, "meta": meta})
        tracking.log_artifact(scores_file)
        if part.samples_file:
            samples_file = metrics_dir / part.samples_file
            write_json(samples_file, samples_out)
            tracking.log_artifact(samples_file)
    return scores


def _lineage(model_dir: Path) -> dict[str, Any]:
    """The merge stage's record of what the merged model came from (adapter hash, train run), if present."""
    info = model_dir / "pipeline_merge.json"
    if not info.is_file():
        return {}
    data = read_json(info)
    return {k: v for k, v in data.items() if k in LINEAGE_TAGS and v}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(PARTS), help="the dvc.yaml stage to run")
    args = parser.parse_args(argv)

    def go() -> None:
        from stages import common, config

        params = config.load()
        common.pin_single_device(params.eval.device)  # one GPU on a multi-GPU host (lm-eval, samples)
        model_dir = BASE_DIR if PARTS[args.stage].model == "base" else MERGED_DIR
        run(params, args.stage, model_dir, PREPARED_DIR, TASKS_DIR, METRICS_DIR)

    from stages.common import run_main

    run_main(go)


if __name__ == "__main__":
    main()
