"""pairs stage: which tokenized pairs a train run consumes, and in which order, decided before training.

Reads: params `seed`, `train.pairs_seed`, `train.eval_pairs`, `train.max_steps`,
`train.per_device_train_batch_size`, `train.gradient_accumulation_steps`, `train.num_processes`,
`train.group_by_length`; data/tokenized/{train,test}.parquet (ids and lengths only).
Writes: data/pairs/selected.parquet (split, id: the set of training pairs and held-out pairs, sorted; what the
reference stage scores), data/pairs/order.parquet (position, id: the training pairs in the order the trainer
consumes them, one row per pair per epoch) and metrics/pairs.json (counts).

A run consumes `max_steps x global batch` pairs (global batch = per_device_train_batch_size x num_processes x num_nodes x
gradient_accumulation_steps). When that is at most the training split, that many pairs are drawn from it with
`train.pairs_seed` (a seeded permutation of the split sorted by id); when it is more, the whole split is taken
and the order runs whole epochs. The held-out pairs for train's eval metrics are the first `train.eval_pairs`
test rows by id (ids are content hashes, so that is an unbiased subset; 0 = the whole test split).

Two seeds, two jobs: `train.pairs_seed` picks WHICH pairs (selected.parquet, the reference stage's input),
the global `seed` picks their ORDER (order.parquet, read by train only): each epoch is a permutation by `seed`,
length-grouped as transformers' LengthGroupedSampler does when `train.group_by_length` (the same function,
transformers.trainer_pt_utils.get_length_grouped_indices, over the global batch). A seed sweep re-writes
order.parquet and leaves selected.parquet byte-identical, so DVC re-runs train but not reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.io import write_json
from dpo_pipeline.layout import METRICS_DIR, PAIRS_DIR, TOKENIZED_DIR
from dpo_pipeline.runner import run_main
from dpo_pipeline.train.pairs import build, write

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

SECTIONS = [
    "seed",
    "train.pairs_seed",
    "train.eval_pairs",
    "train.max_steps",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.num_processes",
    "train.num_nodes",
    "train.group_by_length",
]


def run(
    params: Params,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    pairs_dir: str | Path = PAIRS_DIR,
    metrics_path: str | Path = METRICS_DIR / "pairs.json",
) -> dict[str, Any]:
    from dpo_pipeline import tracking

    with tracking.stage_run("pairs", params, sections=SECTIONS, inputs={"tokenized": Path(tokenized_dir)}):
        selected_table, order_table, metrics = build(params, tokenized_dir)
        write(pairs_dir, selected_table, order_table)
        write_json(metrics_path, metrics)
        tracking.log_metrics(metrics)
        tracking.log_outputs({"pairs": pairs_dir})
    from dpo_pipeline.runner import summary

    summary(
        "pairs",
        f"{metrics['selected_train']} of {metrics['train_rows']} training pairs selected ({metrics['epochs']:.2f} "
        f"epochs), {metrics['eval_pairs']} held-out pairs for train's eval_*",
    )
    return metrics


def main() -> None:
    from dpo_pipeline import config

    run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
