"""The three evaluate stages (dvc.yaml: evaluate_base, evaluate_base_heldout, evaluate): what each scores and
writes, the base files the tuned model's stage checks before any scoring, and the merged model's lineage."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.compare import check_comparable
from dpo_pipeline.evaluate.tasks import heldout_task_names
from dpo_pipeline.io import read_json


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


# models/merged/pipeline_merge.json keys -> MLflow tags (the merge run sets the same ones). Content hashes only:
# the scores files this stage writes are inputs of later stages, so they hold no run id.
LINEAGE_TAGS = {"adapter_hash": "lineage.adapter.hash", "adapter_sha256": "lineage.adapter.sha256"}


def merge_lineage(model_dir: Path) -> dict[str, Any]:
    """The merge stage's record of what the merged model came from (the adapter's hashes), if present."""
    info = model_dir / "pipeline_merge.json"
    if not info.is_file():
        return {}
    data = read_json(info)
    return {k: v for k, v in data.items() if k in LINEAGE_TAGS and v}
