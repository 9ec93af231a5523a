"""merge stage: fold the DPO LoRA adapter into the unquantized base -> one standalone model.

Reads: params `merge`; models/base/ (model + ChatML tokenizer, and pipeline_base.json when the base
stage wrote it); models/adapter/ (adapter_model.safetensors + adapter_config.json + tokenizer, and the
optional train_summary.json: {"params": ..., "metrics": ...}); data/prepared/
(test.parquet for the fidelity prompts, train.parquet's schema metadata for the model card).
Writes: models/merged/ (model.safetensors in `merge.dtype`, config, tokenizer with its chat template, the
model card README.md and pipeline_merge.json with the lineage by content: the adapter's hashes, never a run
id) and metrics/merge.json (flat numbers). The train run that made the adapter is found in MLflow by the
adapter's sha256 (tracking.train_run_of) and tagged on this run, so a train re-run that reproduces the adapter
byte for byte leaves models/merged, and every stage after it, up to date.

Why the unquantized base: QLoRA trains the adapter against the NF4-dequantized weights, but a merge into
the 4-bit model itself has to requantize W + BA back to NF4, and the adapter's delta (small next to the NF4
step size) is mostly rounded away; that is the known QLoRA merge quality problem. So, as the article does,
the base is reloaded in half precision (float16 by default) and the adapter is folded into those weights.

Fidelity gate: the merged model, reloaded from the files just written, must give the same per-token log-probs
as the unmerged adapter-on-base model (same dtype and device) on the first `merge.fidelity_prompts` held-out
rows; only the rounding of W + BA to `merge.dtype` may differ, so `merge.fidelity_max_abs` / `fidelity_mean_abs`
catch a broken merge or save, not noise. Beyond them the stage fails and publishes nothing. The adapter's own
effect (mean |log-prob change| against the base) is reported beside it, to read the tolerance against.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import runner
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, sha256_tree, template_hash, write_json
from dpo_pipeline.layout import (
    ADAPTER_DIR,
    BASE_DIR,
    BASE_INFO,
    MERGE_INFO,
    MERGED_DIR,
    METRICS_DIR,
    PREPARED_DIR,
    TRAIN_SUMMARY,
)
from dpo_pipeline.models import loading
from dpo_pipeline.models.loading import require_safetensors
from dpo_pipeline.models.merge import (
    adapter_summary,
    check_adapter,
    data_metadata,
    fidelity_stats,
    fidelity_texts,
    fidelity_violations,
    model_card,
    read_optional_json,
    token_logprobs,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params


def run(
    params: Params,
    base_dir: str | Path = BASE_DIR,
    adapter_dir: str | Path = ADAPTER_DIR,
    prepared_dir: str | Path = PREPARED_DIR,
    merged_dir: str | Path = MERGED_DIR,
    metrics_path: str | Path = METRICS_DIR / "merge.json",
) -> dict[str, Any]:
    """Merge, check fidelity, publish models/merged and metrics/merge.json; returns the metrics."""
    import pyarrow.parquet as pq
    from peft import PeftModel

    from dpo_pipeline import lineage, tracking
    from dpo_pipeline.models.loading import load_model, load_tokenizer, resolve_device, torch_dtype

    m = params.merge
    base_dir, adapter_dir, prepared_dir, merged_dir = map(
        Path, (base_dir, adapter_dir, prepared_dir, merged_dir)
    )
    require_safetensors(base_dir)
    adapter_config = check_adapter(adapter_dir)
    test_file, train_file = prepared_dir / "test.parquet", prepared_dir / "train.parquet"
    if not test_file.is_file():
        raise StageError(f"{test_file}: held-out test split not found (run the prepare stage first)")
    texts = fidelity_texts(pq.read_table(test_file), m.fidelity_prompts, str(test_file))
    data_meta = data_metadata(pq.read_schema(train_file).metadata) if train_file.is_file() else {}
    train_summary = read_optional_json(adapter_dir / TRAIN_SUMMARY)
    base_info = read_optional_json(base_dir / BASE_INFO)
    # The adapter folder carries the tokenizer it was trained with; fall back to the base's.
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base_dir)

    dtype = torch_dtype(m.dtype)
    device = resolve_device(m.device)
    adapter_sha256 = sha256_tree(adapter_dir)  # the train run's tag (the adapter is small next to the model)

    inputs = {"base": base_dir, "adapter": adapter_dir, "prepared": prepared_dir}
    with tracking.stage_run("merge", params, sections=["merge"], inputs=inputs) as mlflow_run:
        # The hash the run's input tag already holds (DVC's md5 under dvc repro): not worked out twice.
        adapter_hash = lineage.input_hashes(mlflow_run, {"adapter": adapter_dir})["adapter"]
        train_run_id = tracking.train_run_of(adapter_sha256)
        tracking.set_tags(
            {
                "lineage.adapter.sha256": adapter_sha256,
                **({"lineage.train_run_id": train_run_id} if train_run_id else {}),
            }
        )
        encoded = [
            tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(device)
            for t in texts
        ]
        # Unquantized base in merge.dtype (see the module docstring for why not the 4-bit one).
        base_model = load_model(base_dir, dtype=dtype, device_map={"": device})  # straight onto the device
        with loading.damage_named(adapter_dir, "adapter", required=("adapter_config.json",)):
            model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
        adapter_logps = [token_logprobs(model, ids) for ids in encoded]
        with model.disable_adapter():
            base_logps = [token_logprobs(model, ids) for ids in encoded]
        merged = model.merge_and_unload(safe_merge=True)
        merged.to(dtype)
        n_params = sum(p.numel() for p in merged.parameters())

        with atomic_dir(merged_dir) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged, model, base_model
            gc.collect()
            tokenizer.save_pretrained(tmp)
            # Check what was written, not the object in memory: reload the saved folder.
            reloaded = load_model(tmp, dtype=dtype, device_map={"": device}).eval()
            merged_logps = [token_logprobs(reloaded, ids) for ids in encoded]
            del reloaded

            fidelity = fidelity_stats(adapter_logps, merged_logps)
            effect = fidelity_stats(adapter_logps, base_logps)
            metrics = {
                "fidelity_max_abs_diff": fidelity["max_abs"],
                "fidelity_mean_abs_diff": fidelity["mean_abs"],
                "fidelity_prompts": len(texts),
                "fidelity_tokens": fidelity["tokens"],
                "adapter_effect_max_abs": effect["max_abs"],
                "adapter_effect_mean_abs": effect["mean_abs"],
                "merged_params": n_params,
            }
            tracking.log_metrics(metrics)
            problems = fidelity_violations(fidelity, m)
            if problems:
                raise StageError(
                    f"merge fidelity check failed on {len(texts)} held-out prompts from {test_file} "
                    f"(merged vs adapter-on-base log-probs in {m.dtype}): {'; '.join(problems)}. "
                    f"Nothing was published: {merged_dir} and {metrics_path} are unchanged."
                )

            merge_section = {f"merge.{k}": v for k, v in params.section("merge").items()}
            info = {
                "base": base_info,
                "data": data_meta,
                "adapter": adapter_summary(adapter_config),
                "adapter_hash": adapter_hash,
                "adapter_sha256": adapter_sha256,
                "train_params": train_summary.get("params"),
                "train_metrics": train_summary.get("metrics"),
                "merge": merge_section,
                "fidelity": {
                    k: metrics[k]
                    for k in ("fidelity_max_abs_diff", "fidelity_mean_abs_diff", "fidelity_prompts")
                },
                "chat_template_sha": template_hash(tokenizer.chat_template),
            }
            (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
            write_json(
                tmp / MERGE_INFO,
                {
                    "adapter_hash": adapter_hash,
                    "adapter_sha256": adapter_sha256,
                    "base": base_info,
                    "dtype": m.dtype,
                    "chat_template_sha": info["chat_template_sha"],
                },
            )
        write_json(metrics_path, metrics)
        tracking.set_tags({"lineage.adapter.hash": adapter_hash})
        tracking.log_outputs({"merged": merged_dir})
    runner.summary(
        "merge",
        f"fidelity over {metrics['fidelity_tokens']} tokens of {metrics['fidelity_prompts']} prompts: max "
        f"|diff| {metrics['fidelity_max_abs_diff']:.4f} (gate {params.merge.fidelity_max_abs}), mean "
        f"{metrics['fidelity_mean_abs_diff']:.5f} (gate {params.merge.fidelity_mean_abs}) -> {merged_dir}",
    )
    return metrics


def main() -> None:
    from dpo_pipeline import config

    def _run() -> None:
        params = config.load()
        loading.pin_single_device(params.merge.device)  # one GPU on a multi-GPU host
        run(params)

    runner.run_main(_run)


if __name__ == "__main__":
    main()
