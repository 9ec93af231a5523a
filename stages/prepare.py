"""prepare stage: raw preference rows, any common format, one source or a mixture -> train/test Parquet rendered
with the base tokenizer's chat template, for DPO.

Reads: params `data.*` but the length limits (SECTIONS); the raw rows of each source (config.sources: `data.path`
or `data.hub_name` at the pinned `data.hub_revision` through `datasets`, or every entry of `data.sources` with
`data.source: mix`, its local files inside the `data.path` folder); the tokenizer in models/base/ (its chat
template and special tokens). The stage does not read `seed` (dvc.yaml does not declare it): the split and each
source's share are by content hash, rows keep their input order, and the trainer shuffles.
Writes: data/prepared/train.parquet, data/prepared/test.parquet (zstd, with schema metadata) and
metrics/data.json.

Steps:
1. Read and validate every row of every source, in its format (`data.format`, detected with auto:
   dpo_pipeline/data/formats.py). Structural problems (missing column, null or non-string text, a message that
   is not {role, content}, an unparseable JSON line, no rows, an unsupported file type) stop the stage with a
   message naming the file, the row and the column, before anything is written: previous outputs stay
   byte-identical. Implicit prompts that leave no prompt or not one answer are dropped and counted.
2. Each source's quality filters (data.filters: ties, scores, flagged rows, swaps), then its share (fraction,
   max_rows), counted per source.
3. Content filters over all sources drop rows and count each reason (first matching reason wins, in REASONS
   order; duplicates across sources too).
4. Rendering with the base's chat template (`chatml.render_pair`): the prompt is every turn with the generation
   prompt, each answer what the template adds for the assistant's turn. For ChatML that is exactly Maxime
   Labonne's NeuralHermes-2.5 article (`chatml.format_row`): each answer closed with `<|im_end|>\n`.
5. A train/test split by a stable hash of each row's content: a row's split depends only on its own
   text, so adding rows never moves existing ones. The hash also gives the row id.

Token ids and the length limits (data.max_prompt_length, data.max_length) are the tokenize stage's
(stages/tokenize.py): this stage reads no token-related params, so changing a limit does not re-run it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_pipeline import runner
from dpo_pipeline.data.filters import check_split
from dpo_pipeline.data.prepare import combine, data_metrics, prepare_table, read_all
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import (
    atomic_dir,
    template_hash,
    write_json,
    write_prepared,
)
from dpo_pipeline.layout import BASE_DIR, METRICS_DIR, PREPARED_DIR
from dpo_pipeline.models.loading import load_tokenizer

# Exactly the params this stage declares in dvc.yaml (the length limits belong to the tokenize stage).
SECTIONS = [
    "data.source",
    "data.path",
    "data.hub_name",
    "data.hub_revision",
    "data.hub_split",
    "data.format",
    "data.filters",
    "data.fraction",
    "data.max_rows",
    "data.sources",
    "data.test_fraction",
]


def run(
    params,
    raw_path: str | Path | None = None,
    base_dir: str | Path = BASE_DIR,
    prepared_dir: str | Path = PREPARED_DIR,
    metrics_path: str | Path = METRICS_DIR / "data.json",
) -> dict[str, Any]:
    """Prepare the data; returns the metrics written to `metrics_path`."""
    from dataclasses import replace

    from dpo_pipeline import tracking

    data = params.data
    base_dir = Path(base_dir)
    if raw_path is not None:  # tests: one local file in place of data.path
        data = replace(data, source="local", path=str(raw_path), sources=[])
    if data.source == "hub":
        inputs = {"base": base_dir}
        tags = {"input.raw.hub": f"{data.hub_name}@{data.hub_revision}:{data.hub_split}"}
    else:  # a local file, or the folder holding a mixture's files
        inputs = {"raw": Path(data.path), "base": base_dir}
        tags = {}

    with tracking.stage_run("prepare", params, sections=SECTIONS, inputs=inputs, tags=tags):
        # Read and validate everything before writing anything.
        reads = read_all(data)
        table, summary = combine(reads, data)
        source = str(data.path) if data.source == "mix" else reads[0].label
        if not base_dir.is_dir():
            raise StageError(
                f"{base_dir}: base model folder not found (run the base stage first: dvc repro base)"
            )
        tokenizer = load_tokenizer(base_dir)
        train, test, counts = prepare_table(table, tokenizer, data, summary)
        metrics = data_metrics(train, test, counts)
        check_split(train, test, metrics, source, data)
        raw_hash = reads[0].raw_hash if len(reads) == 1 else ",".join(f"{r.name}={r.raw_hash}" for r in reads)

        meta = {
            "raw_source": source if len(reads) == 1 else ", ".join(r.label for r in reads),
            "raw_data_hash": raw_hash,
            "raw_format": metrics["format"],
            "chat_template_hash": template_hash(tokenizer.chat_template),
            "rows_in": metrics["rows_in"],
            "rows_out": metrics["rows_out"],
            "rows_train": metrics["rows_train"],
            "rows_test": metrics["rows_test"],
            "test_fraction": data.test_fraction,
            # What the filters dropped, for the decontaminate stage's report: {reason: rows}.
            "dropped": json.dumps({k: v for k, v in metrics.items() if k.startswith("dropped_")}),
            "sources": json.dumps(metrics["sources"], sort_keys=True),
        }
        with atomic_dir(prepared_dir) as tmp:
            write_prepared(tmp, train, test, meta)
        write_json(metrics_path, metrics)

        per_source = {
            f"source/{name}/{key}": value
            for name, entry in metrics["sources"].items()
            for key, value in entry.items()
        }
        tracking.log_metrics({**metrics, **per_source})
        tracking.set_tags({"data.raw_format": metrics["format"], "data.raw_data_hash": raw_hash})
        tracking.log_outputs({"prepared": prepared_dir})
    dropped = ", ".join(
        f"{k[len('dropped_') :]} {v}" for k, v in metrics.items() if k.startswith("dropped_") and v
    )
    runner.summary(
        "prepare",
        f"{metrics['rows_in']} rows in ({metrics['format']}, {len(metrics['sources'])} source(s)) -> "
        f"train {metrics['rows_train']}, test {metrics['rows_test']}; dropped: {dropped or 'none'}",
    )
    return metrics


def main() -> None:
    from dpo_pipeline import config

    def _run() -> None:
        run(config.load())

    runner.run_main(_run)


if __name__ == "__main__":
    main()
