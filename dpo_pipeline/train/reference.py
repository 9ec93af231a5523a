"""Reference log-probs: compute (trl's own machinery), attach to the training rows, staleness checks."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import layout
from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import PAIRS_DIR, REF_COLUMNS
from dpo_pipeline.models import loading
from dpo_pipeline.models.loading import (
    load_tokenizer,
    require_safetensors,
)
from dpo_pipeline.train import pairs, trl_glue
from dpo_pipeline.train.pairs import index_by_id

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

# Exactly the params the reference stage declares in dvc.yaml (train checks meta.json against them).
SECTIONS = [
    "train.load_in_4bit",
    "train.bnb_4bit_quant_type",
    "train.bnb_4bit_compute_dtype",
    "train.bnb_4bit_use_double_quant",
    "train.distributed",
    "train.precision",
    "train.device",
    "train.precompute_ref",
    "train.reference_batch_size",
    "train.share_prompt",
    "train.method",
    "train.ld_alpha",
]


def computes(p: Params) -> bool:
    """Whether the reference stage runs the model: only method dpo reads its log-probs, and only with
    train.precompute_ref. simpo, cpo and orpo have no reference model; kto's KL term needs log-probs of
    mismatched completions, which trl computes inside train (dpo_pipeline/train/methods.py)."""
    return p.train.method == "dpo" and p.train.precompute_ref


def reference_config(p: Params, out_dir: str | Path):
    """DPOConfig for the reference forward: only declared params; trl's defaults for the rest (batch size).

    max_length=None: the tokenize stage already applied data.max_length, so trl must not cut anything."""
    from trl import DPOConfig

    from dpo_pipeline.models.loading import precision_kwargs

    return DPOConfig(
        output_dir=str(out_dir),
        max_length=None,
        **precision_kwargs(p.train),
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=p.train.reference_batch_size,
        # LD-DPO weights the answer tokens past the shorter answer's length in the reference log-probs too.
        ld_alpha=p.train.ld_alpha,
        **trl_glue.checkpointing_kwargs(False),
        report_to="none",
        dataloader_num_workers=0,
    )


def placeholder_adapter():
    """A LoRA config that is never enabled: the Trainer refuses a bare 4-bit model, so the base is wrapped as
    in train and trl computes the reference with the adapter disabled, i.e. from the base alone (its B matrices
    are zero too). Fixed here, not from params: LoRA settings cannot change the reference."""
    from peft import LoraConfig

    return LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def longest_first(dataset):
    """`dataset` reordered by the length column, longest first (stable: ties keep the tokenized order).

    Fixed, not a param: the order changes only how much padding the batches carry, never the output, which is
    joined back by id. Longest first, so a batch too large for the device fails at once, not at the end.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from dpo_pipeline.layout import LENGTH_COLUMN

    order = pc.array_sort_indices(pa.array(dataset[LENGTH_COLUMN], pa.int64()), order="descending")
    return dataset.select(order.to_pylist())


def shared_scratch(tokenized_dir: str | Path) -> str | None:
    """A folder every process of a multi-process reference run sees at the same path (None with one process:
    the system's temp folder). The processes agree on the name through torchrun's run id."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    folder = (
        Path(tokenized_dir).resolve().parent.parent
        / layout.SCRATCH_DIR
        / ("reference-" + os.environ.get("TORCHELASTIC_RUN_ID", "run"))
    )
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def compute(
    params: Params, base_dir: str | Path, tokenized_dir: str | Path, pairs_dir: str | Path = PAIRS_DIR
) -> dict[str, Any]:
    """{split: pyarrow Table(id, ref_chosen_logps, ref_rejected_logps)} for the selected train and test pairs."""
    import pyarrow as pa

    from dpo_pipeline.data.tables import read_tokenized
    from dpo_pipeline.train.pairs import read_selected

    require_safetensors(base_dir)  # a clear error before transformers would try the hub with the path
    tokenizer = load_tokenizer(base_dir)
    selected = read_selected(pairs_dir)
    tokenized = {
        split: pairs.rows_in_order(
            read_tokenized(tokenized_dir, split),
            sorted(selected[split]),
            Path(tokenized_dir) / f"{split}.parquet",
        )
        for split in layout.SPLITS
    }
    datasets = {split: pairs.to_dataset(table) for split, table in tokenized.items()}
    trl_glue.log_versions()
    model = loading.load_policy(base_dir, params.train)
    # Several processes share one output folder (trl's precompute exchanges its results through it).
    shared = shared_scratch(tokenized_dir)
    with contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory() as out_dir:
        trainer = trl_glue.trainer_class(params.train.share_prompt)(
            model=model,
            args=reference_config(params, out_dir),
            train_dataset=longest_first(datasets["train"]),
            eval_dataset=longest_first(datasets["test"]),
            processing_class=tokenizer,
            peft_config=placeholder_adapter(),
        )
        trl_glue.log_sharing(trainer, "reference")
        computed = {"train": trainer.train_dataset, "test": trainer.eval_dataset}
        tables = {}
        for split, dataset in computed.items():
            path = Path(tokenized_dir) / f"{split}.parquet"
            in_computed_order = pa.table(
                {
                    "id": pa.array(dataset["id"], pa.string()),
                    **{name: pa.array(dataset[name], pa.float32()) for name in REF_COLUMNS},
                }
            )
            require_each_pair_once(in_computed_order.column("id"), tokenized[split].num_rows, path)
            # Back to id order (the order of `tokenized` here), joined by id.
            ids = pa.table({"id": tokenized[split].column("id").cast(pa.string())})
            tables[split] = attach_reference(ids, in_computed_order, path).combine_chunks()
    if shared:  # every process has read its copy of the gathered log-probs: the exchange folder can go
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            import shutil

            shutil.rmtree(shared, ignore_errors=True)
    return tables


def require_each_pair_once(ids, expected: int, path: str | Path) -> None:
    """The reference pass scored every selected pair exactly once. Several processes each score a share and
    gather the results: a pair scored twice (a share padded to equal length and not trimmed) or dropped would
    otherwise reach train as a wrong or missing row. Missing ids are named by attach_reference."""
    import pyarrow.compute as pc

    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()
    if repeated or len(ids) != expected:
        problem = (
            f"{len(repeated)} pair(s) scored more than once, e.g. {repeated[:3]}"
            if repeated
            else "none twice"
        )
        raise StageError(
            f"{path}: the reference pass returned {len(ids)} rows for {expected} pairs ({problem}); every pair "
            "must be scored exactly once (launch.reference_num_processes: 1 scores in one process)"
        )


def attach_reference(table, reference, reference_path: str | Path):
    """Add the cached ref_chosen_logps / ref_rejected_logps to `table` by id, keeping `table`'s row order."""
    missing_columns = [c for c in ("id", *REF_COLUMNS) if c not in reference.column_names]
    if missing_columns:
        raise StageError(f"{reference_path}: missing column(s) {', '.join(missing_columns)}")
    index, missing, first = index_by_id(table.column("id"), reference)
    if missing:
        raise StageError(
            f"{reference_path}: no reference log-probs for {missing} tokenized row(s), e.g. id {first!r}; "
            "the reference is stale (run: dvc repro reference)"
        )
    for name in REF_COLUMNS:
        table = table.append_column(name, reference.column(name).take(index).cast("float32"))
    return table


def read_reference(reference_dir: str | Path, split: str, expected: dict[str, Any]):
    """The cached reference log-probs of a split, after checking they were made from the same inputs/params."""
    import pyarrow.parquet as pq

    reference_dir = Path(reference_dir)
    meta_path = reference_dir / "meta.json"
    if not meta_path.is_file():
        raise StageError(f"{meta_path}: not found (train.precompute_ref is true: run dvc repro reference)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("computed"):
        raise StageError(
            f"{meta_path}: the reference stage cached nothing (it ran with train.method "
            f"{meta.get('params', {}).get('train', {}).get('method')!r}, train.precompute_ref "
            f"{meta.get('precompute_ref')!r}; run: dvc repro reference)"
        )
    for key, value in expected.items():
        if meta.get(key) != value:
            raise StageError(
                f"{meta_path}: {key} is {meta.get(key)!r}, this run expects {value!r}; the cached reference "
                "log-probs were made from other inputs or params (run: dvc repro reference)"
            )
    path = reference_dir / f"{split}.parquet"
    if not path.is_file():
        raise StageError(f"{path}: not found (run: dvc repro reference)")
    return pq.read_table(path)
