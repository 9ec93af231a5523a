"""raw sources -> the prepared splits: each source read, filtered and shared (raw.read_source, filters.take_share),
then the content filters, the chat template and the split, in that order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.chatml import prompt_messages, render_pair, require_template, template_controls
from dpo_pipeline.data.filters import (
    REASONS,
    content_masks,
    digests,
    first_reason,
    is_test,
    row_id,
    special_texts,
    take_share,
)
from dpo_pipeline.data.formats import CONVERSION_REASONS, QUALITY_REASONS

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams
    from dpo_pipeline.data.raw import SourceRead

# The prompt as the prepared rows carry it: every turn, system first (Parquet list<struct<role, content>>).
MESSAGE_FIELDS = ("role", "content")


def read_all(data: DataParams, local_only: bool = False) -> list[SourceRead]:
    """Every source the run reads (config.sources), converted and filtered; `local_only` skips hub sources (the
    validate stage reads no network)."""
    from dpo_pipeline.config import sources
    from dpo_pipeline.data.raw import read_source

    return [read_source(spec) for spec in sources(data) if spec.path or not local_only]


def combine(reads: list[SourceRead], data: DataParams) -> tuple[Any, dict[str, Any]]:
    """The sources' rows after each one's share (fraction / max_rows), in data.sources order, as one table, and
    the counts so far: {rows_in, format, sources: {name: {format, rows_in, dropped_<reason>..., swapped}}}."""
    import pyarrow as pa

    from dpo_pipeline.config import sources

    specs = {s.name: s for s in sources(data)}
    tables, per_source = [], {}
    for read in reads:
        spec = specs[read.name]
        table, left_out = take_share(read.table, spec.fraction, spec.max_rows)
        tables.append(table)
        counts = {k: v for k, v in read.counts.items() if k != "rows_in"}
        per_source[read.name] = {
            "format": read.format,
            "rows_in": read.counts["rows_in"],
            **{f"dropped_{k}": v for k, v in counts.items() if k != "swapped"},
            "dropped_not_sampled": left_out,
            "swapped": counts["swapped"],
        }
    formats = {read.format for read in reads}
    summary = {
        "rows_in": sum(s["rows_in"] for s in per_source.values()),
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "sources": per_source,
    }
    return pa.concat_tables(tables), summary


def split_rows(table, data: DataParams, specials) -> tuple[dict[str, list[int]], dict[str, int], list[bytes]]:
    """Which rows the content filters keep and which split each goes to: ({split: row indices in input order},
    drop counts per reason, each row's content digest). No formatting, no tokenizer (`specials` are its texts,
    filters.special_texts): cheap enough for the validate stage to run it on the whole file before DVC removes
    any output."""
    row_digests = digests(table)
    keep, counts = first_reason(content_masks(table, row_digests, specials), table.num_rows, REASONS)
    rows: dict[str, list[int]] = {"train": [], "test": []}
    for i, (digest, kept) in enumerate(zip(row_digests, keep.to_pylist(), strict=True)):
        if kept:
            rows["test" if is_test(digest, data.test_fraction) else "train"].append(i)
    return rows, counts, row_digests


def data_metrics(train, test, counts: dict[str, Any]) -> dict[str, Any]:
    """metrics/data.json: flat counts (readable in `dvc metrics diff`), the format read and, per source, its own
    counts. Every raw row is accounted for: rows_in = rows_out + every dropped_* count."""
    sources = {name: dict(entry) for name, entry in counts.get("sources", {}).items()}
    metrics: dict[str, Any] = {
        "rows_in": counts["rows_in"],
        "rows_out": train.num_rows + test.num_rows,
        "rows_train": train.num_rows,
        "rows_test": test.num_rows,
    }
    for reason in REASONS:
        metrics[f"dropped_{reason}"] = counts["dropped"].get(reason, 0)
    for reason in (*CONVERSION_REASONS, *QUALITY_REASONS, "not_sampled"):
        metrics[f"dropped_{reason}"] = sum(s.get(f"dropped_{reason}", 0) for s in sources.values())
    metrics["swapped"] = sum(s.get("swapped", 0) for s in sources.values())
    kept: dict[str, int] = {}
    for table in (train, test):
        if getattr(table, "column_names", None) and "source" in table.column_names:
            for name in table["source"].to_pylist():
                kept[name] = kept.get(name, 0) + 1
    for name, entry in sources.items():
        entry["rows_out"] = kept.get(name, 0)
    metrics["format"] = counts.get("format", "orca")
    metrics["sources"] = sources
    return metrics


def check_split_sizes(
    table, data: DataParams, source: str, global_batch: int, specials, summary
) -> dict[str, Any]:
    """The prepare stage's split checks (filters.check_split) on the combined raw table, plus enough training
    rows for one optimizer step (`global_batch` distinct pairs); returns prepare's data metrics."""
    from types import SimpleNamespace

    from dpo_pipeline.data.filters import check_split
    from dpo_pipeline.errors import StageError

    rows, counts, _ = split_rows(table, data, specials)
    train, test = (SimpleNamespace(num_rows=len(rows[split])) for split in ("train", "test"))
    metrics = data_metrics(train, test, {**summary, "dropped": counts})
    check_split(train, test, metrics, source, data)
    if train.num_rows < global_batch:
        raise StageError(
            f"{source}: the train split keeps {train.num_rows} rows (data.test_fraction={data.test_fraction}), "
            f"fewer than one global batch of {global_batch} pairs; add rows or lower data.test_fraction"
        )
    return metrics


def prepare_table(
    table, tokenizer, data: DataParams, summary: dict[str, Any] | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Combined raw table (layout.RAW_COLUMNS, or TEXT_COLUMNS alone) -> (train table, test table, counts)
    following `data` params; rows holding one of the tokenizer's special tokens (models.special_tokens) or one
    of its template's control strings are dropped as `special_token`. `summary`: combine's counts (for a bare
    table, one source of its own rows).

    Each split's rows are taken from the raw table once, in input order, and rendered there: one copy of the
    text per split, not a filtered copy and then a split copy.
    """
    import pyarrow as pa

    from dpo_pipeline.data.formats import history_messages
    from dpo_pipeline.models.loading import special_tokens

    if summary is None:
        summary = {"rows_in": table.num_rows, "format": "orca", "sources": {}}
    require_template(tokenizer)
    specials = special_texts(special_tokens(tokenizer), template_controls(tokenizer))
    rows, counts, row_digests = split_rows(table, data, specials)
    has_history = "history" in table.column_names
    message_type = pa.list_(pa.struct([(name, pa.string()) for name in MESSAGE_FIELDS]))
    splits = []
    for indices in rows.values():
        part = table.take(pa.array(indices, pa.int64()))
        systems, questions = part["system"].to_pylist(), part["question"].to_pylist()
        histories = part["history"].to_pylist() if has_history else ["[]"] * part.num_rows
        chosen_in, rejected_in = part["chosen"].to_pylist(), part["rejected"].to_pylist()
        conversations, prompts, chosen, rejected = [], [], [], []
        for i, (s, h, q) in enumerate(zip(systems, histories, questions, strict=True)):
            messages = prompt_messages(s, history_messages(h) if h != "[]" else [], q)
            where = f" (row {row_id(row_digests[indices[i]])})"
            prompt, (c, r) = render_pair(messages, [chosen_in[i], rejected_in[i]], tokenizer, where)
            conversations.append(messages)
            prompts.append(prompt)
            chosen.append(c)
            rejected.append(r)
        source = (
            part["source"] if "source" in table.column_names else pa.array([""] * part.num_rows, pa.string())
        )
        splits.append(
            pa.table(
                {
                    "id": pa.array([row_id(row_digests[i]) for i in indices], pa.string()),
                    "source": source,
                    "system": part["system"],
                    "question": part["question"],
                    "messages": pa.array(conversations, message_type),
                    "prompt": pa.array(prompts, pa.string()),
                    "chosen": pa.array(chosen, pa.string()),
                    "rejected": pa.array(rejected, pa.string()),
                },
            )
        )
    train, test = splits
    return train, test, {**summary, "dropped": counts}
