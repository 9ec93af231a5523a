"""Which pairs a train run consumes and in which order (the pairs stage's rules, read by reference and train)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import (
    atomic_dir,
)
from dpo_pipeline.layout import ORDER_FILE, SELECTED_FILE, TOKENIZED_COLUMNS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params, TrainParams


def global_batch(t: TrainParams) -> int:
    return t.per_device_train_batch_size * t.num_processes * t.num_nodes * t.gradient_accumulation_steps


def pairs_needed(t: TrainParams) -> int:
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


def build(params: Params, tokenized_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(selected table, order table, metrics) from the tokenized splits and the declared params."""
    import pyarrow as pa

    from dpo_pipeline.data.tables import read_tokenized
    from dpo_pipeline.layout import LENGTH_COLUMN

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


def index_by_id(ids, table) -> tuple[Any, int, str | None]:
    """(row index of each of `ids` in `table`, how many are missing, the first missing id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(list(ids) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids).cast(
        pa.string()
    )
    index = pc.index_in(wanted, value_set=table.column("id").cast(pa.string()))
    first = wanted.filter(pc.is_null(index))[0].as_py() if index.null_count else None
    return index, index.null_count, first


def rows_in_order(table, ids: Sequence[str], path: str | Path):
    """The rows of `table` for `ids`, in that order (an id may repeat: one row per epoch it is trained in)."""
    index, missing, first = index_by_id(ids, table)
    if missing:
        raise StageError(
            f"{path}: {missing} pair(s) of data/pairs are not in the tokenized data, e.g. id {first!r}; "
            "data/pairs is stale (run: dvc repro pairs)"
        )
    return table.take(index)


def to_dataset(table, keep: Sequence[str] = ()):
    """Tokenized rows -> a datasets.Dataset with what trl reads (the ids), the id, the length used by
    length-grouped batching and any `keep` columns (cached reference log-probs)."""
    import pyarrow as pa
    from datasets import Dataset

    return Dataset(pa.table({name: table.column(name) for name in (*TOKENIZED_COLUMNS, *keep)}))
