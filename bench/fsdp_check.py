"""FSDP2 + QLoRA at world size 1 (train.distributed fsdp): the GPU check's last step (`make gpu-check`).

`run(work)` (in the GPU check's process) launches this module the way the train stage launches itself with
`train.distributed: fsdp`: `accelerate launch --config_file configs/accelerate/fsdp2_qlora.yaml` with one
process (dpo_pipeline/train/launch.py's own command). The worker (`python -m bench.fsdp_check --work DIR`, under
accelerate) trains the GPU check's model for 2 steps on its pairs and cached reference, with the recipe's params
but `train.distributed: fsdp` and `train.optim: adamw_torch` (the paged optimizer is refused with sharding),
gathers the adapter (dpo.adapter_state) and saves it (dpo.save_adapter). It passes when accelerate really
sharded the model with FSDP, and the saved adapter holds the same LoRA weights (names, shapes) as the GPU
check's unsharded adapter, all finite.

On the CPU (`make gpu-check DRY_RUN=1`) it is skipped with the reason: accelerate enables FSDP only on
accelerators, and the params check refuses `train.distributed: fsdp` with `train.device: cpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def fsdp_params(dry_run: bool):
    from bench.gpu_check import _replace, recipe_params

    params = recipe_params(dry_run, STEPS)
    return _replace(params, train={"distributed": "fsdp", "optim": "adamw_torch"})


def run(work: Path, dry_run: bool) -> dict[str, Any] | str:
    """Launch the worker on the GPU check's folder `work`; its verdict, or why it did not run."""
    if dry_run:
        return "skipped on the CPU: accelerate enables FSDP only on accelerators (a GPU check only)"
    from dpo_pipeline.train import launch

    params = fsdp_params(dry_run)
    argv = launch.launch_command(
        params,
        launch.this_machine(),
        launch.accelerate_config(params, {}, REPO),
        module="bench.fsdp_check",
        processes=1,
    )
    argv += ["--work", str(work)]
    print("gpu-check: " + " ".join(argv), file=sys.stderr)
    result = subprocess.run(argv, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, check=False)
    verdict_path = work / "fsdp.json"
    if result.returncode != 0 or not verdict_path.exists():
        return {
            "ok": False,
            "exit_code": result.returncode,
            "log_tail": (result.stdout + result.stderr)[-3000:],
        }
    return json.loads(verdict_path.read_text(encoding="utf-8"))


def worker(work: Path) -> None:
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from bench.gpu_check import training_datasets
    from dpo_pipeline.models import loading
    from dpo_pipeline.train import dpo, trl_glue

    params = fsdp_params(dry_run=False)
    base_dir = work / "base"
    tables = {split: pq.read_table(work / "reference" / f"{split}.parquet") for split in ("train", "test")}
    tokenizer = loading.load_tokenizer(base_dir)
    trainer = trl_glue.trainer_class(params.train.share_prompt)(
        model=loading.load_policy(base_dir, params.train),
        args=dpo.dpo_config(params, work / "fsdp-checkpoints"),
        train_dataset=training_datasets(work, tables)["train"],
        processing_class=tokenizer,
        peft_config=loading.lora_config(params.train.lora),
    )
    output = trainer.train()
    state = dpo.adapter_state(trainer)  # a collective: every process gathers
    if not trainer.accelerator.is_main_process:
        return
    dpo.save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, work / "fsdp-adapter", state)
    sharded = load_file(work / "fsdp-adapter" / "adapter_model.safetensors")
    plain = load_file(work / "adapter" / "adapter_model.safetensors")
    same_shapes = sharded.keys() == plain.keys() and all(sharded[k].shape == plain[k].shape for k in plain)
    finite = all(bool(torch.isfinite(t).all()) for t in sharded.values())
    verdict = {
        "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)),
        "distributed_type": trainer.accelerator.distributed_type.value,
        "quant_storage": str(loading.bnb_config(params.train).bnb_4bit_quant_storage),
        "steps": int(trainer.state.global_step),
        "train_loss": float(output.training_loss),
        "adapter_tensors": len(sharded),
        "same_names_and_shapes_as_unsharded": same_shapes,
        "finite": finite,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    verdict["ok"] = bool(verdict["fsdp_enabled"] and same_shapes and finite and verdict["steps"] == STEPS)
    (work / "fsdp.json").write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="the GPU check's folder (base, pairs, reference)"
    )
    worker(parser.parse_args(argv).work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
