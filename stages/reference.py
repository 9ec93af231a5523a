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
would compute on the fly. Only method dpo with `train.precompute_ref` reads them; otherwise (`precompute_ref:
false`, the reference-free simpo, cpo and orpo, and kto, whose trainer computes its own) no model is loaded and
only meta.json is written (`computed: false`: a marker that keeps the DAG stable).

The rows go through trl longest first and are put back into the tokenized order by id afterwards: trl's collator
pads each batch to its longest row, so batches of similar lengths waste almost nothing on padding (about a third
of the tokens on the small profile in prepared order). Each row's log-probs do not depend on its batch-mates
(right padding under the attention mask), so the order changes the numbers only by float noise (~1e-5).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, write_json
from dpo_pipeline.layout import BASE_DIR, PAIRS_DIR, REFERENCE_DIR, TOKENIZED_DIR
from dpo_pipeline.models.loading import pin_single_device
from dpo_pipeline.train.reference import SECTIONS, compute, computes

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params


def run(
    params: Params,
    base_dir: str | Path = BASE_DIR,
    tokenized_dir: str | Path = TOKENIZED_DIR,
    reference_dir: str | Path = REFERENCE_DIR,
    pairs_dir: str | Path = PAIRS_DIR,
) -> dict[str, Any]:
    """Write data/reference/; returns its meta.json content."""
    import pyarrow.parquet as pq

    from dpo_pipeline import lineage, tracking
    from dpo_pipeline.layout import SELECTED_FILE

    selected_file = Path(pairs_dir) / SELECTED_FILE
    inputs = {"base": Path(base_dir), "tokenized": Path(tokenized_dir), "selected": selected_file}
    with tracking.stage_run("reference", params, sections=SECTIONS, inputs=inputs) as mlflow_run:
        hashes = lineage.input_hashes(mlflow_run, inputs)
        meta: dict[str, Any] = {
            "precompute_ref": params.train.precompute_ref,
            "base_hash": hashes["base"],
            "tokenized_hash": hashes["tokenized"],
            "selected_hash": hashes["selected"],
            "params": lineage.params_for(params, SECTIONS),
        }
        meta["computed"] = computes(params)
        if not meta["computed"]:
            print(
                f"reference: nothing to compute (train.method {params.train.method}, train.precompute_ref "
                f"{str(params.train.precompute_ref).lower()}): no model loaded, only meta.json written",
                file=sys.stderr,
            )
        tables = compute(params, base_dir, tokenized_dir, pairs_dir) if meta["computed"] else {}
        if tracking.is_secondary_rank():
            return meta  # trl gathered every process's share of the rows; the first process writes them
        meta["rows"] = {split: table.num_rows for split, table in tables.items()}
        with atomic_dir(reference_dir) as tmp:
            for split, table in tables.items():
                pq.write_table(table, tmp / f"{split}.parquet")
            write_json(tmp / "meta.json", meta)
        tracking.log_metrics({f"rows_{split}": n for split, n in meta["rows"].items()})
        tracking.log_outputs({"reference": reference_dir})
        from dpo_pipeline.runner import summary

        scored = ", ".join(f"{split} {n}" for split, n in meta["rows"].items())
        summary("reference", f"scored {scored} pairs" if meta["computed"] else "no model work (see above)")
        return meta


def _main() -> None:
    from dpo_pipeline import config
    from dpo_pipeline.train import launch

    params = config.load()
    n = params.launch.reference_num_processes
    if launch.is_distributed_worker(os.environ):
        launch.die_with_parent()  # a worker never outlives its launcher
        if int(os.environ["WORLD_SIZE"]) != n:
            raise StageError(
                f"launch.reference_num_processes is {n}, this process runs in a group of "
                f"{os.environ['WORLD_SIZE']}: start the stage with `python -m stages.reference`"
            )
    elif n > 1 and computes(params):
        sys.exit(launch.launch_reference(params))
    else:
        if n > 1:
            print(
                f"reference: launch.reference_num_processes {n} unused: this run computes no log-probs",
                file=sys.stderr,
            )
        pin_single_device(params.train.device)  # one GPU, no DataParallel, on a multi-GPU host
    run(params)


def main() -> None:
    from dpo_pipeline.runner import run_main

    run_main(_main)


if __name__ == "__main__":
    main()
