"""tokenize stage: the prepared pairs -> the token ids trl trains on, with the length limits applied.

Reads: params `data.max_prompt_length`, `data.max_length`; models/base/ (the tokenizer);
data/prepared/{train,test}.parquet; data/contamination/drop.parquet.
Writes: data/tokenized/{train,test}.parquet (id, prompt_ids, chosen_ids, rejected_ids as int32 lists and
`length`, in the prepared order; zstd, with schema metadata) and metrics/tokens.json.

The ids are exactly what trl 1.16's DPOTrainer would make of the prepared strings (`tokenize_pairs`: the
same tokenizer calls, in batches; a stage test compares it with trl's own `_prepare_dataset` column by
column): eos appended to each answer, prompt, prompt+chosen and prompt+rejected tokenized with the
tokenizer's special tokens, the answer starting where the joint sequence leaves the prompt's tokens. The
reference and train stages hand these ids to trl as they are, so the pipeline tokenizes once per
(prepared data, tokenizer, length limits) and a sweep over beta, learning rate or steps never tokenizes.

Rows dropped, first matching reason wins:
- contaminated: a training row the decontaminate stage selected (data/contamination/drop.parquet: empty
  unless `decontamination.drop` is true); the held-out split is never filtered for it;
and the length limits, on those ids (what trl would see, special tokens included):
- prompt_too_long: the prompt is longer than data.max_prompt_length tokens;
- too_long: prompt + the longer answer is longer than data.max_length tokens (trl's max_length: no row is
  ever truncated in training).
The held-out split is filtered the same way here (train's eval_* metrics); the evaluate stage's lm-eval
tasks read the prepared test split whole, so changing a limit does not change what evaluate scores.

metrics/tokens.json: rows_{train,test} kept, dropped_{reason} (both splits), and the 50/90/99th percentile
and max of prompt_tokens, chosen_tokens, rejected_tokens over the kept rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import runner
from dpo_pipeline.data.tables import read_drop_ids, read_prepared
from dpo_pipeline.data.tokens import check_split, token_metrics, tokenize_split
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, write_json
from dpo_pipeline.layout import BASE_DIR, CONTAMINATION_DIR, METRICS_DIR, PREPARED_DIR, SPLITS, TOKENIZED_DIR
from dpo_pipeline.models.loading import load_tokenizer

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

logger = logging.getLogger("stages.tokenize")  # the same name when run as __main__


# Exactly the params this stage declares in dvc.yaml.
SECTIONS = ["data.max_prompt_length", "data.max_length"]


def run(
    params: Params,
    base_dir: str | Path = BASE_DIR,
    prepared_dir: str | Path = PREPARED_DIR,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    metrics_path: str | Path = METRICS_DIR / "tokens.json",
    contamination_dir: str | Path = CONTAMINATION_DIR,
) -> dict[str, Any]:
    """Tokenize both prepared splits; returns the metrics written to `metrics_path`."""
    import pyarrow.parquet as pq

    from dpo_pipeline import tracking
    from dpo_pipeline.io import parquet_metadata

    base_dir, prepared_dir = Path(base_dir), Path(prepared_dir)
    inputs = {"base": base_dir, "prepared": prepared_dir, "contamination": Path(contamination_dir)}
    with tracking.stage_run("tokenize", params, sections=SECTIONS, inputs=inputs):
        prepared = {split: read_prepared(prepared_dir, split) for split in SPLITS}
        if not base_dir.is_dir():
            raise StageError(
                f"{base_dir}: base model folder not found (run the base stage first: dvc repro base)"
            )
        tokenizer = load_tokenizer(base_dir)
        drop = {
            "train": read_drop_ids(contamination_dir),
            "test": frozenset(),
        }  # the held-out split is scored whole
        tables, counts = {}, {}
        for split in SPLITS:
            tables[split], counts[split] = tokenize_split(
                prepared[split], tokenizer, params.data, drop[split]
            )
        metrics = token_metrics(tables, counts)
        check_split(tables, metrics, prepared_dir, params.data)
        meta = {"max_prompt_length": params.data.max_prompt_length, "max_length": params.data.max_length}
        with atomic_dir(tokenized_dir) as tmp:
            for split, table in tables.items():
                table = table.replace_schema_metadata(parquet_metadata({**meta, "split": split}))
                pq.write_table(table, tmp / f"{split}.parquet", compression="zstd")
        write_json(metrics_path, metrics)
        tracking.log_metrics(metrics)
        tracking.log_outputs({"tokenized": tokenized_dir})
    runner.summary(
        "tokenize",
        f"train {metrics['rows_train']}, test {metrics['rows_test']} rows; dropped: contaminated "
        f"{metrics['dropped_contaminated']}, prompt_too_long {metrics['dropped_prompt_too_long']}, too_long "
        f"{metrics['dropped_too_long']}; prompt tokens p50 {metrics['prompt_tokens_p50']:.0f}, max "
        f"{metrics['prompt_tokens_max']:.0f}",
    )
    return metrics


def main() -> None:
    from dpo_pipeline import config

    runner.run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
