"""reference stage: the reference model's log-probs of the pairs a train run uses, computed once.

Reads: params: the base-loading `train.*` keys (load_in_4bit, bnb_4bit_*, precision, device) and
`train.precompute_ref`, nothing else (no seed, no length limit: neither can change a log-prob of these ids);
models/base/; data/tokenized/{train,test}.parquet (the token ids, written by stages/tokenize.py: this stage
never tokenizes); data/pairs/selected.parquet (which training and held-out pairs train uses: stages/pairs.py).
Writes: data/reference/{train,test}.parquet (id, ref_chosen_logps, ref_rejected_logps as float32, in id
order) and data/reference/meta.json (the inputs' hashes and the params they were made with, checked by train).

Only the selected pairs are scored: `max_steps x global batch` training pairs (or the whole split when a run
takes more) and `train.eval_pairs` held-out ones, not every tokenized row. DPO's reference model is the frozen
base, so its log-probs depend only on the base and the ids, never on beta, learning rate, LoRA, the order or
the seed: a sweep over those re-runs train only and skips this forward pass. The numbers come from trl's own machinery (DPOTrainer collator and
`precompute_ref_log_probs`) with the base loaded by `stages.train.load_policy`, i.e. exactly what train
would compute on the fly. With `train.precompute_ref: false` only meta.json is written (a marker that keeps
the DAG stable) and train computes the reference log-probs itself.

The rows go through trl longest first and are put back into the tokenized order by id afterwards: trl's collator
pads each batch to its longest row, so batches of similar lengths waste almost nothing on padding (about a third
of the tokens on the small profile in prepared order). Each row's log-probs do not depend on its batch-mates
(right padding under the attention mask), so the order changes the numbers only by float noise (~1e-5).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from stages.common import (
    BASE_DIR,
    PAIRS_DIR,
    REFERENCE_DIR,
    TOKENIZED_DIR,
    atomic_dir,
    load_tokenizer,
    pin_single_device,
    require_safetensors,
    write_json,
)

# Exactly the params this stage declares in dvc.yaml.
SECTIONS = [
    "train.load_in_4bit",
    "train.bnb_4bit_quant_type",
    "train.bnb_4bit_compute_dtype",
    "train.bnb_4bit_use_double_quant",
    "train.precision",
    "train.device",
    "train.precompute_ref",
]


def reference_config(p: Any, out_dir: str | Path):
    """DPOConfig for the reference forward: only declared params; trl's defaults for the rest (batch size).

    max_length=None: the tokenize stage already applied data.max_length, so trl must not cut anything."""
    from trl import DPOConfig

    from stages.train import precision_kwargs

    return DPOConfig(
        output_dir=str(out_dir),
        max_length=None,
        **precision_kwargs(p.train),
        precompute_ref_log_probs=True,
        gradient_checkpointing=False,
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

    from stages.train import LENGTH_COLUMN

    order = pc.array_sort_indices(pa.array(dataset[LENGTH_COLUMN], pa.int64()), order="descending")
    return dataset.select(order.to_pylist())


def compute(
    params: Any, base_dir: str | Path, tokenized_dir: str | Path, pairs_dir: str | Path = PAIRS_DIR
) -> dict[str, Any]:
    """{split: pyarrow Table(id, ref_chosen_logps, ref_rejected_logps)} for the selected train and test pairs."""
    import pyarrow as pa

    from stages import train
    from stages.pairs import read_selected

    require_safetensors(base_dir)  # a clear error before transformers would try the hub with the path
    tokenizer = load_tokenizer(base_dir)
    selected = read_selected(pairs_dir)
    tokenized = {
        split: train.rows_in_order(
            train.read_tokenized(tokenized_dir, split),
            sorted(selected[split]),
            Path(tokenized_dir) / f"{split}.parquet",
        )
        for split in train.SPLITS
    }
    datasets = {split: train.to_dataset(table) for split, table in tokenized.items()}
    model = train.load_policy(base_dir, params.train)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = train._trainer_class()(
            model=model,
            args=reference_config(params, out_dir),
            train_dataset=longest_first(datasets["train"]),
            eval_dataset=longest_first(datasets["test"]),
            processing_class=tokenizer,
            peft_config=placeholder_adapter(),
        )
        computed = {"train": trainer.train_dataset, "test": trainer.eval_dataset}
        tables = {}
        for split, dataset in computed.items():
            path = Path(tokenized_dir) / f"{split}.parquet"
            in_computed_order = pa.table(
                {
                    "id": pa.array(dataset["id"], pa.string()),
                    **{name: pa.array(dataset[name], pa.float32()) for name in train.REF_COLUMNS},
                }
            )
            # Back to id order (the order of `tokenized` here), joined by id.
            ids = pa.table({"id": tokenized[split].column("id").cast(pa.string())})
            tables[split] = train.attach_reference(ids, in_computed_order, path).combine_chunks()
    return tables


def run(
    params: Any,
    base_dir: str | Path = BASE_DIR,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    reference_dir: str | Path = REFERENCE_DIR,
    pairs_dir: str | Path = PAIRS_DIR,
) -> dict[str, Any]:
    """Write data/reference/; returns its meta.json content."""
    import pyarrow.parquet as pq

    from stages import tracking, train
    from stages.pairs import SELECTED_FILE

    selected_file = Path(pairs_dir) / SELECTED_FILE
    inputs = {"base": Path(base_dir), "tokenized": Path(tokenized_dir), "selected": selected_file}
    with tracking.stage_run("reference", params, sections=SECTIONS, inputs=inputs) as mlflow_run:
        hashes = train._input_hashes(mlflow_run, inputs)
        meta: dict[str, Any] = {
            "precompute_ref": params.train.precompute_ref,
            "base_sha256": hashes["base"],
            "tokenized_sha256": hashes["tokenized"],
            "selected_sha256": hashes["selected"],
            "params": tracking.params_for(params, SECTIONS),
        }
        tables = compute(params, base_dir, tokenized_dir, pairs_dir) if params.train.precompute_ref else {}
        meta["rows"] = {split: table.num_rows for split, table in tables.items()}
        with atomic_dir(reference_dir) as tmp:
            for split, table in tables.items():
                pq.write_table(table, tmp / f"{split}.parquet")
            write_json(tmp / "meta.json", meta)
        tracking.log_metrics({f"rows_{split}": n for split, n in meta["rows"].items()})
        tracking.log_outputs({"reference": reference_dir})
        return meta


def main() -> None:
    from stages import config

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = config.load()
    pin_single_device(params.train.device)  # one GPU, no DataParallel, on a multi-GPU host
    run(params)


if __name__ == "__main__":
    from stages.common import run_main

    run_main(main)
