"""pairs stage: which tokenized pairs a train run consumes, and in which order, decided before training.

Reads: params `seed`, `train.pairs_seed`, `train.eval_pairs`, `train.max_steps`,
`train.per_device_train_batch_size`, `train.gradient_accumulation_steps`, `train.num_processes`,
`train.group_by_length`; data/tokenized/{train,test}.parquet (ids and lengths only).
Writes: data/pairs/selected.parquet (split, id: the set of training pairs and held-out pairs, sorted; what the
reference stage scores), data/pairs/order.parquet (position, id: the training pairs in the order the trainer
consumes them, one row per pair per epoch) and metrics/pairs.json (counts).

A run consumes `max_steps x global batch` pairs (global batch = per_device_train_batch_size x num_processes x
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

import math
from pathlib import Path
from typing import Any

from stages.common import METRICS_DIR, PAIRS_DIR, TOKENIZED_DIR, StageError, atomic_dir, run_main, write_json

SECTIONS = [
    "seed",
    "train.pairs_seed",
    "train.eval_pairs",
    "train.max_steps",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.num_processes",
    "train.group_by_length",
]
SELECTED_FILE = "selected.parquet"
ORDER_FILE = "order.parquet"


def global_batch(t: Any) -> int:
    return t.per_device_train_batch_size * t.num_processes * t.gradient_accumulation_steps


def pairs_needed(t: Any) -> int:
    """Pairs one run consumes: every optimizer step takes one global batch."""
    return t.max_steps * global_batch(t)


def select_train(ids: list[str], needed: int, pairs_seed: int) -> list[str]:
    """The training pairs a run uses, sorted by id: `needed` of them drawn with `pairs_seed`, or all."""
    import numpy as np

    ordered = sorted(ids)
    if needed >= len(ordered):
        return ordered
    pick = np.random.default_rng(pairs_seed).permutation(len(ordered))[:needed]
    return sorted(ordered[i] for i in pick)


def select_eval(ids: list[str], eval_pairs: int) -> list[str]:
    """The held-out pairs train evaluates on: the first `eval_pairs` by id (0 = all)."""
    ordered = sorted(ids)
    return ordered if eval_pairs == 0 else ordered[:eval_pairs]


def training_order(
    selected: list[str], lengths: dict[str, int], needed: int, seed: int, batch: int, group_by_length: bool
) -> list[str]:
    """`needed` ids in the order training consumes them: epochs of seeded permutations of `selected`,
    length-grouped over the global batch like transformers' LengthGroupedSampler when `group_by_length`."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    if not selected:
        raise StageError("no training pairs to order")
    generator = torch.Generator().manual_seed(seed)
    order: list[str] = []
    for _ in range(math.ceil(needed / len(selected))):
        if group_by_length:
            indices = get_length_grouped_indices([lengths[i] for i in selected], batch, generator=generator)
        else:
            indices = torch.randperm(len(selected), generator=generator).tolist()
        order.extend(selected[i] for i in indices)
    return order[:needed]


def build(params: Any, tokenized_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(selected table, order table, metrics) from the tokenized splits and the declared params."""
    import pyarrow as pa

    from stages.tokenize import LENGTH_COLUMN, read_tokenized

    t = params.train
    tables = {
        split: read_tokenized(tokenized_dir, split, ("id", LENGTH_COLUMN)) for split in ("train", "test")
    }
    train_ids = tables["train"].column("id").to_pylist()
    lengths = dict(zip(train_ids, tables["train"].column(LENGTH_COLUMN).to_pylist(), strict=True))
    needed = pairs_needed(t)
    selected = select_train(train_ids, needed, t.pairs_seed)
    held_out = select_eval(tables["test"].column("id").to_pylist(), t.eval_pairs)
    order = training_order(selected, lengths, needed, params.seed, global_batch(t), t.group_by_length)
    selected_table = pa.table(
        {
            "split": pa.array(["train"] * len(selected) + ["test"] * len(held_out), pa.string()),
            "id": pa.array(selected + held_out, pa.string()),
        }
    )
    order_table = pa.table(
        {"position": pa.array(range(len(order)), pa.int32()), "id": pa.array(order, pa.string())}
    )
    metrics = {
        "pairs_needed": needed,
        "train_rows": len(train_ids),
        "selected_train": len(selected),
        "epochs": round(needed / len(selected), 6),
        "eval_pairs": len(held_out),
        "test_rows": tables["test"].num_rows,
    }
    return selected_table, order_table, metrics


def write(pairs_dir: str | Path, selected_table, order_table) -> None:
    """data/pairs/{selected,order}.parquet, replaced in one rename."""
    import pyarrow.parquet as pq

    with atomic_dir(pairs_dir) as tmp:
        pq.write_table(selected_table, tmp / SELECTED_FILE)
        pq.write_table(order_table, tmp / ORDER_FILE)


def run(
    params: Any,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    pairs_dir: str | Path = PAIRS_DIR,
    metrics_path: str | Path = METRICS_DIR / "pairs.json",
) -> dict[str, Any]:
    from stages import tracking

    with tracking.stage_run("pairs", params, sections=SECTIONS, inputs={"tokenized": Path(tokenized_dir)}):
        selected_table, order_table, metrics = build(params, tokenized_dir)
        write(pairs_dir, selected_table, order_table)
        write_json(metrics_path, metrics)
        tracking.log_metrics(metrics)
        tracking.log_outputs({"pairs": pairs_dir})
    return metrics


def read_selected(pairs_dir: str | Path) -> dict[str, list[str]]:
    """{split: ids} from data/pairs/selected.parquet."""
    import pyarrow.parquet as pq

    path = Path(pairs_dir) / SELECTED_FILE
    if not path.is_file():
        raise StageError(f"{path}: not found (run: dvc repro pairs)")
    table = pq.read_table(path)
    out: dict[str, list[str]] = {"train": [], "test": []}
    for split, row_id in zip(table.column("split").to_pylist(), table.column("id").to_pylist(), strict=True):
        out[split].append(row_id)
    return out


def read_order(pairs_dir: str | Path) -> list[str]:
    """The training ids in training order, from data/pairs/order.parquet."""
    import pyarrow.parquet as pq

    path = Path(pairs_dir) / ORDER_FILE
    if not path.is_file():
        raise StageError(f"{path}: not found (run: dvc repro pairs)")
    return pq.read_table(path).sort_by("position").column("id").to_pylist()


def training_ids(pairs_dir: str | Path) -> dict[str, list[str]]:
    """{"train": the training ids in training order, "test": the held-out ids}: what train reads."""
    return {"train": read_order(pairs_dir), "test": read_selected(pairs_dir)["test"]}


def main() -> None:
    from stages import config

    run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
