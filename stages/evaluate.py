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
                         Writes metrics/eval_base_heldout.json and, per document, eval_base_heldout_docs.json.
  evaluate               the merged model on every task, plus samples, after checking that the base's files
                         above were made with the same settings (before any scoring). Writes
                         metrics/eval_merged.json, eval_merged_docs.json, metrics/samples.json (with the base's
                         samples beside its own).
The comparison (tuned vs base, deltas with their uncertainty, calibration against published figures) is the
cheap `report` stage's (stages/report.py), so reading the scores another way never re-scores a model.
Each scores file carries a nested `meta` (lm-eval version, seed, batch size, limit, few-shot counts, primary
metric per task, chat template hash). Besides lm-eval's metrics a scores file holds the figures made from
per-document results (scoring.document_figures: preference accuracy by which answer is longer, held-out answer
lengths) and from the samples (scoring.sample_figures: turns ended, lengths).

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
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.compare import check_comparable, document_figures, heldout_documents
from dpo_pipeline.evaluate.harness import (
    flat_scores,
    load_eval_model,
    primary_keys,
    run_lm_eval,
    settings_meta,
)
from dpo_pipeline.evaluate.samples import generate_samples, generation_meta, sample_figures
from dpo_pipeline.evaluate.tasks import heldout_task_names
from dpo_pipeline.io import read_json, template_hash, write_json
from dpo_pipeline.layout import BASE_DIR, MERGED_DIR, METRICS_DIR, PREPARED_DIR, TASKS_DIR
from dpo_pipeline.models import loading
from dpo_pipeline.models.loading import require_safetensors


@dataclasses.dataclass(frozen=True)
class Part:
    """What one evaluate stage scores and writes (dvc.yaml names the same stage names and paths)."""

    model: str  # "base" (models/base) or "merged" (models/merged)
    tasks: str  # "benchmarks": tasks that read no pipeline data; "heldout": those that do; "all"
    scores_file: str
    samples_file: str | None  # None: no sample generations in this stage
    sections: tuple[str, ...]  # the params the stage declares (and logs)
    docs_file: str | None = None  # per-document results of the held-out tasks (None: the stage scores none)


# The scoring settings of `eval` (the held-out stage makes no samples, so the generation keys are not its).
SCORING_SECTIONS = (
    "seed",
    "eval.tasks",
    "eval.batch_size",
    "eval.limit",
    "eval.device",
    "eval.dtype",
    "eval.task_max_new_tokens",
)


PARTS = {
    "evaluate_base": Part("base", "benchmarks", "eval_base.json", "samples_base.json", ("seed", "eval")),
    "evaluate_base_heldout": Part(
        "base", "heldout", "eval_base_heldout.json", None, SCORING_SECTIONS, "eval_base_heldout_docs.json"
    ),
    "evaluate": Part(
        "merged",
        "all",
        "eval_merged.json",
        "samples.json",
        ("seed", "eval"),
        "eval_merged_docs.json",
    ),
}


BASE_PARTS = ("evaluate_base", "evaluate_base_heldout")


def part_tasks(part: Part, task_names: list[str], tasks_dir: str | Path) -> list[str]:
    """The eval.tasks names one stage scores, in params order."""
    if part.tasks == "all":
        return list(task_names)
    heldout = heldout_task_names(tasks_dir)
    return [n for n in task_names if (n in heldout) == (part.tasks == "heldout")]


def read_base_scores(meta: dict[str, Any], metrics_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(base samples, the files read) after checking that each base stage's files exist and hold scores made
    with this run's settings: checked before any scoring, since the report compares them."""
    files: dict[str, Path] = {}
    for stage in BASE_PARTS:
        part = PARTS[stage]
        for name in filter(None, (part.scores_file, part.samples_file, part.docs_file)):
            path = metrics_dir / name
            if not path.is_file():
                raise StageError(f"{path}: base model results not found (run `dvc repro {stage}` first)")
        path = metrics_dir / part.scores_file
        check_comparable(meta, read_json(path).get("meta", {}), path, stage)
        files[stage] = path
    return read_json(metrics_dir / PARTS["evaluate_base"].samples_file), files


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

    from dpo_pipeline import tracking
    from dpo_pipeline.models.loading import load_tokenizer

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
    base_samples: dict[str, Any] | None = None
    base_files: dict[str, Path] = {}
    if part.model == "merged":
        # Checked before any scoring: the report's deltas against base scores made with other settings
        # would mean nothing, and an hour of scoring would be wasted on the 7B recipe.
        base_samples, base_files = read_base_scores(meta, metrics_dir)

    tokenizer = load_tokenizer(model_dir)
    lineage = _lineage(model_dir)
    # Named as the producing stage names its output.
    inputs: dict[str, Path] = {part.model: model_dir, "tasks": tasks_dir}
    if reads_data:
        inputs["prepared"] = prepared_dir
    inputs.update({Path(path).stem: path for path in base_files.values()})
    with tracking.stage_run(
        stage,
        params,
        sections=list(part.sections),
        inputs=inputs,
        tags={"eval.model": part.model, **{LINEAGE_TAGS[k]: str(v) for k, v in lineage.items()}},
    ):
        # The train run, found by the adapter's content hash: tagged on this run, never written to a file.
        train_run_id = tracking.train_run_of(str(lineage.get("adapter_sha256", "")))
        if train_run_id:
            tracking.set_tags({"lineage.train_run_id": train_run_id})
        loaded = load_eval_model(model_dir, e, tokenizer)  # once, for scoring and samples
        results = run_lm_eval(model_dir, params, tasks_dir, prepared_dir, loaded, names) if names else {}
        scores = flat_scores(results, names)
        primary = primary_keys(results, names)
        documents = heldout_documents(results, names, tasks_dir, tokenizer) if part.docs_file else {}
        scores.update(document_figures(documents))
        # documents scored per task (groups such as mmlu are counted per sub-task by lm-eval)
        n_samples = {t: int(n["effective"]) for t, n in results.get("n-samples", {}).items() if t in names}
        samples = generate_samples(model_dir, params, loaded) if part.samples_file else []
        del loaded, results
        gc.collect()
        scores.update(sample_figures(samples))
        meta.update(
            {
                "model": part.model,
                "tasks": names,
                "primary_metric": primary,
                "n_samples": n_samples,
                "chat_template_sha": template_hash(tokenizer.chat_template),
                **{k: str(v) for k, v in lineage.items()},
            }
        )
        samples_out: dict[str, Any] = (
            {"model": part.model, "generation": generation_meta(params), "samples": samples}
            if part.samples_file
            else {}
        )
        if base_samples is not None:
            samples_out["base_samples"] = base_samples.get("samples", [])
        tracking.log_metrics(scores)
        tracking.set_tags({"chat_template_sha": meta["chat_template_sha"]})
        scores_file = metrics_dir / part.scores_file
        write_json(scores_file, {**scores, "meta": meta})
        tracking.log_artifact(scores_file)
        if part.docs_file:
            write_json(metrics_dir / part.docs_file, {"model": part.model, "tasks": documents})
        if part.samples_file:
            samples_file = metrics_dir / part.samples_file
            write_json(samples_file, samples_out)
            tracking.log_artifact(samples_file)
    return scores


# models/merged/pipeline_merge.json keys -> MLflow tags (the merge run sets the same ones). Content hashes only:
# the scores files this stage writes are inputs of later stages, so they hold no run id.
LINEAGE_TAGS = {"adapter_hash": "lineage.adapter.hash", "adapter_sha256": "lineage.adapter.sha256"}


def _lineage(model_dir: Path) -> dict[str, Any]:
    """The merge stage's record of what the merged model came from (the adapter's hashes), if present."""
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
        from dpo_pipeline import config

        params = config.load()
        loading.pin_single_device(params.eval.device)  # one GPU on a multi-GPU host (lm-eval, samples)
        model_dir = BASE_DIR if PARTS[args.stage].model == "base" else MERGED_DIR
        run(params, args.stage, model_dir, PREPARED_DIR, TASKS_DIR, METRICS_DIR)

    from dpo_pipeline.runner import run_main

    run_main(go)


if __name__ == "__main__":
    main()
