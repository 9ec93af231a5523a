"""Token ids exactly as trl makes them, the length limits, the tokenized Parquet contract."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.tables import strip_turn_newline, trl_texts  # noqa: F401 - re-exported
from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import IDS_COLUMNS, LENGTH_COLUMN, SPLITS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams

logger = logging.getLogger(__name__)


REASONS = (
    "contaminated",  # a training row the decontaminate stage selected (data/contamination/drop.parquet)
    "prompt_too_long",  # prompt longer than data.max_prompt_length tokens
    "too_long",  # prompt + the longer answer longer than data.max_length tokens
)


PERCENTILES = (50, 90, 99)


CHUNK_ROWS = 1024  # rows per batched tokenizer call: bounds the Python lists of ids held at once


def tokenize_pairs(
    table, tokenizer, eos: str, max_length: int | None = None, truncation_mode: str = "keep_start"
):
    """What trl 1.16's DPOTrainer._prepare_dataset makes of plain-text pairs, with batched tokenizer calls.

    `table`: a pyarrow Table with string columns prompt, chosen, rejected (others are kept). Returns it with
    eos appended to the answers that lack it and prompt_ids, chosen_ids, rejected_ids (int64 lists, as trl's
    map writes them) added. The same steps on the same strings as trl: tokenize prompt, prompt+chosen and
    prompt+rejected with `tokenizer(text=...)` (special tokens added as trl adds them), split at the common
    prefix of the prompt and both joint sequences, and, given `max_length` under keep_start truncation, drop
    rows whose prompt fills it. trl does this one row at a time through `Dataset.map`; batches of CHUNK_ROWS
    rows let the Rust tokenizer use every core and the ids go straight into Arrow (the whole stage's work on
    11,739 orca-sized rows: 13.2 s against trl's 18.5 s here, see README, Performance).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from trl.data_utils import common_prefix_length

    def prefix(ids: list[int], joint: list[int]) -> int:
        n = len(ids)
        return n if joint[:n] == ids else common_prefix_length(ids, joint)

    def with_eos(texts: list[str]) -> list[str]:
        return [t if t.endswith(eos) else t + eos for t in texts]

    ids_type = pa.list_(pa.int64())
    parts: dict[str, list] = {name: [] for name in ("chosen", "rejected", *IDS_COLUMNS)}
    diverged = 0  # rows whose tokenized prompt is not a prefix of prompt+answer (trl warns about those too)
    for start in range(0, table.num_rows, CHUNK_ROWS):
        chunk = table.slice(start, CHUNK_ROWS)
        prompts = chunk.column("prompt").to_pylist()
        chosen = with_eos(chunk.column("chosen").to_pylist())
        rejected = with_eos(chunk.column("rejected").to_pylist())
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        chosen_ids = tokenizer(text=[p + c for p, c in zip(prompts, chosen, strict=True)])["input_ids"]
        rejected_ids = tokenizer(text=[p + r for p, r in zip(prompts, rejected, strict=True)])["input_ids"]
        cut = [
            min(prefix(p, c), prefix(p, r))
            for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)
        ]
        diverged += sum(n < len(p) for p, n in zip(prompt_ids, cut, strict=True))
        parts["chosen"].append(pa.array(chosen, pa.string()))
        parts["rejected"].append(pa.array(rejected, pa.string()))
        parts["prompt_ids"].append(pa.array([p[:n] for p, n in zip(prompt_ids, cut, strict=True)], ids_type))
        parts["chosen_ids"].append(pa.array([c[n:] for c, n in zip(chosen_ids, cut, strict=True)], ids_type))
        parts["rejected_ids"].append(
            pa.array([r[n:] for r, n in zip(rejected_ids, cut, strict=True)], ids_type)
        )
    if diverged:
        logger.warning(
            "%d of %d rows: the tokenized prompt is not a prefix of the tokenized prompt+answer (the chat "
            "template renders the prompt differently alone, or tokens merge across the boundary); as in trl, "
            "the answer starts where they diverge and the rest of the prompt is left out of training",
            diverged,
            table.num_rows,
        )
    for name, arrays in parts.items():
        column = pa.chunked_array(arrays, ids_type if name in IDS_COLUMNS else pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    if max_length is not None and truncation_mode == "keep_start":
        table = table.filter(pc.less(pc.list_value_length(table["prompt_ids"]), max_length))
    return table


def token_lengths(table) -> dict[str, Any]:
    """{prompt, chosen, rejected: int32 arrays of each row's token count} of a table with the ids columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return {
        name.removesuffix("_ids"): pc.list_value_length(table[name]).cast(pa.int32()) for name in IDS_COLUMNS
    }


def length_masks(prompt, total, data: DataParams) -> dict[str, Any]:
    """Boolean drop masks of the length limits from each row's prompt and prompt + longer answer token counts,
    each True where that reason applies."""
    import pyarrow.compute as pc

    return {
        "prompt_too_long": pc.greater(prompt, data.max_prompt_length),
        "too_long": pc.greater(total, data.max_length),
    }


def tokenize_split(prepared, tokenizer, data: DataParams, drop_ids=frozenset()) -> tuple[Any, dict[str, int]]:
    """One prepared split -> (tokenized Table with TOKENIZED_COLUMNS in the prepared order, drops per reason);
    rows whose id is in `drop_ids` are dropped as `contaminated`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dpo_pipeline.data.filters import first_reason

    tokenized = tokenize_pairs(trl_texts(prepared, tokenizer.eos_token), tokenizer, tokenizer.eos_token)
    lengths = token_lengths(tokenized)
    total = pc.add(lengths["prompt"], pc.max_element_wise(lengths["chosen"], lengths["rejected"]))
    masks = length_masks(lengths["prompt"], total, data)
    masks["contaminated"] = pc.is_in(
        tokenized.column("id"), value_set=pa.array(sorted(drop_ids), pa.string())
    )
    keep, counts = first_reason(masks, tokenized.num_rows, REASONS)
    ids32 = pa.list_(pa.int32())
    table = pa.table(
        {
            "id": tokenized.column("id"),
            **{name: tokenized.column(name).cast(ids32) for name in IDS_COLUMNS},
            LENGTH_COLUMN: total,
        }
    )
    return table.filter(keep), counts


def percentile_metrics(name: str, values) -> dict[str, float]:
    import numpy as np

    array = np.asarray(values, dtype=np.int64)
    if array.size == 0:
        return {f"{name}_p{q}": 0.0 for q in PERCENTILES} | {f"{name}_max": 0.0}
    out = {f"{name}_p{q}": float(np.percentile(array, q)) for q in PERCENTILES}
    out[f"{name}_max"] = float(array.max())
    return out


def token_metrics(tables: dict[str, Any], counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Flat metrics for metrics/tokens.json (readable in `dvc metrics diff`)."""
    import pyarrow as pa

    metrics: dict[str, Any] = {f"rows_{split}": tables[split].num_rows for split in SPLITS}
    for reason in REASONS:
        metrics[f"dropped_{reason}"] = sum(counts[split][reason] for split in SPLITS)
    both = pa.concat_tables([tables[split] for split in SPLITS])
    for name, values in token_lengths(both).items():
        metrics.update(percentile_metrics(f"{name}_tokens", values.to_numpy()))
    return metrics


def check_split(tables: dict[str, Any], metrics: dict[str, Any], source: Path, data: DataParams) -> None:
    dropped = ", ".join(f"{r}={metrics[f'dropped_{r}']}" for r in REASONS)
    for split in SPLITS:
        if tables[split].num_rows == 0:
            raise StageError(
                f"{source / (split + '.parquet')}: no rows fit the length limits (data.max_prompt_length="
                f"{data.max_prompt_length}, data.max_length={data.max_length}; dropped: {dropped}); "
                "raise the limits or check the data"
            )
