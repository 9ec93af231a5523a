"""prepare stage: raw preference rows -> ChatML-formatted train/test Parquet for DPO.

Reads: params `data.*` but the length limits (SECTIONS); the raw rows (`data.path`: .jsonl, .json or
.parquet; or, with `data.source: hub`, `data.hub_name` at the pinned `data.hub_revision` through
`datasets`); the tokenizer in models/base/ (its chat template). The stage does not read `seed` (dvc.yaml does not declare it):
the split is by content hash, rows keep their input order, and the trainer shuffles.
Writes: data/prepared/train.parquet, data/prepared/test.parquet (zstd, with schema metadata) and
metrics/data.json.

Steps:
1. Read and validate every row. Structural problems (missing column, null or non-string text, an
   unparseable JSON line, no rows, an unsupported file type) stop the stage with a message naming the
   file, the row and the column, before anything is written: previous outputs stay byte-identical.
2. Content filters drop rows and count each reason (first matching reason wins, in REASONS order).
3. ChatML formatting exactly as in Maxime Labonne's NeuralHermes-2.5 article (`chatml.format_row`): the
   prompt is the conversation rendered by the base tokenizer's chat template (one call per row,
   `chatml.format_prompt`), each answer closed with `<|im_end|>\n`.
4. A train/test split by a stable hash of each row's content: a row's split depends only on its own
   text, so adding rows never moves existing ones. The hash also gives the row id.

Token ids and the length limits (data.max_prompt_length, data.max_length) are the tokenize stage's
(stages/tokenize.py): this stage reads no token-related params, so changing a limit does not re-run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_pipeline import runner
from dpo_pipeline.data.filters import check_split, data_metrics
from dpo_pipeline.data.prepare import prepare_table
from dpo_pipeline.data.raw import read_hub, read_local
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import (
    atomic_dir,
    sha256_file,
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
    "data.columns",
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
    from dpo_pipeline import tracking

    data = params.data
    base_dir = Path(base_dir)
    if data.source == "local":
        raw = Path(raw_path if raw_path is not None else data.path)
        inputs = {"raw": raw, "base": base_dir}
        tags = {}
    else:
        raw = None
        inputs = {"base": base_dir}
        tags = {"input.raw.hub": f"{data.hub_name}@{data.hub_revision}:{data.hub_split}"}

    with tracking.stage_run("prepare", params, sections=SECTIONS, inputs=inputs, tags=tags):
        # Read and validate everything before writing anything.
        if raw is not None:
            table, schema = read_local(raw, data.columns)
            source, raw_hash = str(raw), sha256_file(raw)
        else:
            table, schema, label = read_hub(data)
            source, raw_hash = label, label
        if not base_dir.is_dir():
            raise StageError(
                f"{base_dir}: base model folder not found (run the base stage first: dvc repro base)"
            )
        tokenizer = load_tokenizer(base_dir)
        train, test, counts = prepare_table(table, tokenizer, data)
        metrics = data_metrics(train, test, counts)
        check_split(train, test, metrics, source, data)

        meta = {
            "raw_source": source,
            "raw_data_hash": raw_hash,
            "raw_schema": schema,
            "chat_template_hash": template_hash(tokenizer.chat_template),
            "rows_in": metrics["rows_in"],
            "rows_out": metrics["rows_out"],
            "rows_train": metrics["rows_train"],
            "rows_test": metrics["rows_test"],
            "test_fraction": data.test_fraction,
        }
        with atomic_dir(prepared_dir) as tmp:
            write_prepared(tmp, train, test, meta)
        write_json(metrics_path, metrics)

        tracking.log_metrics(metrics)
        tracking.set_tags({"data.raw_schema": schema, "data.raw_data_hash": raw_hash})
        tracking.log_outputs({"prepared": prepared_dir})
    return metrics


def main() -> None:
    from dpo_pipeline import config

    def _run() -> None:
        run(config.load())

    runner.run_main(_run)


if __name__ == "__main__":
    main()
