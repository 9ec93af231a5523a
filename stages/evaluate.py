"""evaluate stages: lm-eval scores and seeded sample generations, for the base or the merged (tuned) model.

Three DVC stages run this module (`python -m stages.evaluate <stage>`; parts.PARTS), so each score is remade only when
what it reads changes: evaluate_base (the base on the tasks that read no pipeline data: the recipe's Open LLM
Leaderboard v1 suite, ~1 h of GPU, never re-run by a data edit; and the samples), evaluate_base_heldout (the
base on the tasks/ YAMLs that read data/prepared/test.parquet) and evaluate (the merged model on every task and
the samples, after checking the base's files were made with the same settings). Writes metrics/eval_base.json,
samples_base.json, eval_base_heldout(_docs).json, eval_merged(_docs).json, samples.json: scores, per-document
results and a `meta` of settings and content hashes (no run id: these files are report's inputs). The comparison
is the cheap report stage's. Scoring goes through lm-eval's Python API (`simple_evaluate`, HF backend around
the model loaded once per stage, a TaskManager that also indexes tasks/); docs/scores.md says how to read it.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate import parts
from dpo_pipeline.evaluate.compare import document_figures, heldout_documents
from dpo_pipeline.evaluate.harness import (
    flat_scores,
    load_eval_model,
    primary_keys,
    run_lm_eval,
    settings_meta,
)
from dpo_pipeline.evaluate.samples import generate_samples, generation_meta, sample_figures
from dpo_pipeline.evaluate.tasks import heldout_task_names
from dpo_pipeline.io import template_hash, write_json
from dpo_pipeline.layout import BASE_DIR, MERGED_DIR, METRICS_DIR, PREPARED_DIR, TASKS_DIR
from dpo_pipeline.models import loading
from dpo_pipeline.models.loading import require_safetensors

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params


def run(
    params: Params,
    stage: str,
    model_dir: str | Path,
    prepared_dir: str | Path = PREPARED_DIR,
    tasks_dir: str | Path = TASKS_DIR,
    metrics_dir: str | Path = METRICS_DIR,
) -> dict[str, Any]:
    """Run one evaluate stage (a parts.PARTS key) on the model in `model_dir` and write its files; returns the
    scores. `prepared_dir` is only read by stages that score held-out tasks."""
    from importlib import metadata

    from dpo_pipeline import tracking
    from dpo_pipeline.models.loading import load_tokenizer

    if stage not in parts.PARTS:
        raise StageError(f"evaluate stage: expected one of {', '.join(parts.PARTS)}, got {stage!r}")
    part = parts.PARTS[stage]
    model_dir, prepared_dir, tasks_dir, metrics_dir = map(
        Path, (model_dir, prepared_dir, tasks_dir, metrics_dir)
    )
    require_safetensors(model_dir)
    e = params.eval
    names = parts.part_tasks(part, [t.name for t in e.tasks], tasks_dir)
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
        base_samples, base_files = parts.read_base_scores(meta, metrics_dir)

    tokenizer = load_tokenizer(model_dir)
    lineage = parts.merge_lineage(model_dir)
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
        tags={"eval.model": part.model, **{parts.LINEAGE_TAGS[k]: str(v) for k, v in lineage.items()}},
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
    from dpo_pipeline.runner import summary

    shown = ", ".join(
        f"{k} {v:.3f}"
        for k, v in sorted(scores.items())
        if isinstance(v, float)
        and k.count("/") == 1
        and k.split("/")[1] in ("acc", "acc_norm", "format_ok", "exact_match", "mc2")
    )
    summary(stage, f"{model_dir}: {shown or 'no task of this stage in eval.tasks (nothing to score here)'}")
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(parts.PARTS), help="the dvc.yaml stage to run")
    args = parser.parse_args(argv)

    def go() -> None:
        from dpo_pipeline import config

        params = config.load()
        loading.pin_single_device(params.eval.device)  # one GPU on a multi-GPU host (lm-eval, samples)
        model_dir = BASE_DIR if parts.PARTS[args.stage].model == "base" else MERGED_DIR
        run(params, args.stage, model_dir, PREPARED_DIR, TASKS_DIR, METRICS_DIR)

    from dpo_pipeline.runner import run_main

    run_main(go)


if __name__ == "__main__":
    main()
