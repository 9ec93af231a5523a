"""decontaminate stage: how much of the training data overlaps the evaluation tasks, and optionally drop it.

Reads: params `decontamination`, `eval.tasks`; data/prepared/train.parquet (and test.parquet, the held-out
tasks' documents); each eval task's documents through lm-eval (tasks/ offline; lm-eval's registry and the
hub's datasets for the recipe's Open LLM suite).
Writes: metrics/contamination.json (per task: documents, overlapping training rows, a few examples with the
n-gram they share; in all; how many are dropped; and, under report.prepare_filters, what the prepare stage's
format conversion and quality filters dropped, per reason and per source, read from the prepared split's
metadata) and data/contamination/drop.parquet (the ids of the training
rows tokenize drops and counts as `contaminated`: the overlapping ones with `decontamination.drop: true`,
none otherwise).

Between prepare and tokenize, so dropping re-tokenizes and re-trains but never re-prepares, and a report
never changes what trains. dpo_pipeline/data/contamination.py says how overlap is measured (13-grams of
normalised text as lm-eval's decontamination, per field, boilerplate n-grams left out).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import runner
from dpo_pipeline.io import atomic_dir, write_json
from dpo_pipeline.layout import CONTAMINATION_DIR, DROP_FILE, METRICS_DIR, PREPARED_DIR, TASKS_DIR

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

SECTIONS = ["decontamination", "eval.tasks"]


def run(
    params: Params,
    prepared_dir: str | Path = PREPARED_DIR,
    tasks_dir: str | Path = TASKS_DIR,
    out_dir: str | Path = CONTAMINATION_DIR,
    metrics_path: str | Path = METRICS_DIR / "contamination.json",
) -> dict[str, Any]:
    """Measure (and with decontamination.drop, select for dropping) overlapping rows; returns the metrics."""
    import pyarrow.parquet as pq

    from dpo_pipeline import tracking
    from dpo_pipeline.data.contamination import (
        filter_counts,
        flat_metrics,
        ids_table,
        overlaps,
        read_training_rows,
        require_measurable,
        task_documents,
    )

    d = params.decontamination
    prepared_dir = Path(prepared_dir)
    with tracking.stage_run(
        "decontaminate",
        params,
        sections=SECTIONS,
        inputs={"prepared": prepared_dir, "tasks": Path(tasks_dir)},
    ):
        rows = read_training_rows(prepared_dir)
        documents = task_documents([t.name for t in params.eval.tasks], tasks_dir, prepared_dir)
        for warning in require_measurable(documents, d.ngram):
            print(warning, file=sys.stderr)
        report, hit_ids = overlaps(rows, documents, d.ngram, d.common_rows, d.max_examples)
        report["prepare_filters"] = filter_counts(prepared_dir)
        dropped = hit_ids if d.drop else set()
        metrics = flat_metrics(report, len(dropped))
        with atomic_dir(out_dir) as tmp:
            pq.write_table(ids_table(dropped), tmp / DROP_FILE, compression="zstd")
        write_json(metrics_path, {**metrics, "report": report})
        tracking.log_metrics(metrics)
        tracking.log_artifact(metrics_path)
    runner.summary(
        "decontaminate",
        f"{metrics['rows_overlapping_any_task']} of {metrics['rows_train']} training rows share a "
        f"{d.ngram}-gram with an eval task's documents; {metrics['dropped_contaminated']} selected for dropping",
    )
    return metrics


def main() -> None:
    from dpo_pipeline import config

    runner.run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
