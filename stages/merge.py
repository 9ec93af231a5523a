"""merge stage: fold the DPO LoRA adapter into the unquantized base -> one standalone model.

Reads: params `seed`, `merge`; models/base/ (model + ChatML tokenizer, and pipeline_base.json when the base
stage wrote it); models/adapter/ (adapter_model.safetensors + adapter_config.json + tokenizer, and the
optional train_summary.json: {"params": ..., "metrics": ...}); data/prepared/
(test.parquet for the fidelity prompts, train.parquet's schema metadata for the model card).
Writes: models/merged/ (model.safetensors in `merge.dtype`, config, tokenizer with its chat template, the
model card README.md and pipeline_merge.json with the lineage) and metrics/merge.json (flat numbers).

Why the unquantized base: QLoRA trains the adapter against the NF4-dequantized weights, but a merge into
the 4-bit model itself has to requantize W + BA back to NF4, and the adapter's delta (small next to the NF4
step size) is mostly rounded away; that is the known QLoRA merge quality problem. So, as the article does,
the base is reloaded in half precision (float16 by default) and the adapter is folded into those weights.

Fidelity gate: the merged model, reloaded from the files just written, must give the same per-token
log-probs as the unmerged adapter-on-base model (same dtype, same device) on the first
`merge.fidelity_prompts` held-out rows (test.parquet by id, prompt + chosen). The remaining difference is
only the rounding of W + BA to `merge.dtype` (the unmerged model adds the LoRA product in float32), so the
tolerances catch a broken merge or save (wrong scaling, a module left out, a lost delta), not noise. Both
models run in `merge.dtype`: float16 matmuls work on the CPU in torch 2.13 (about 3x slower than float32,
negligible for the small model; a 7B merge belongs on a GPU, which is used when one is visible). Log-probs
are computed in float32 from the logits. Beyond `merge.fidelity_max_abs` (largest per-token difference) or
`merge.fidelity_mean_abs` (mean) the stage fails and publishes nothing: models/merged/ and
metrics/merge.json keep their previous contents. The adapter's own effect (mean |log-prob change| against
the base with the adapter disabled) is reported next to it, so the tolerance can be read against the size
of what was merged.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from stages.common import (
    ADAPTER_DIR,
    BASE_DIR,
    MERGED_DIR,
    METRICS_DIR,
    PREPARED_DIR,
    StageError,
    atomic_dir,
    flatten,
    read_json,
    require_safetensors,
    sha256_tree,
    template_hash,
    write_json,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_SUMMARY = "train_summary.json"
BASE_INFO = "pipeline_base.json"
MERGE_INFO = "pipeline_merge.json"
DATA_META_PREFIX = "dpo."  # prefix of the prepare stage's Parquet schema metadata keys


# ---------------------------------------------------------------------------------------------------------
# Pure builders


def fidelity_texts(table, n: int, source: str = "test.parquet") -> list[str]:
    """prompt + chosen of the first `n` rows by id (fewer if the split is smaller)."""
    missing = [c for c in ("id", "prompt", "chosen") if c not in table.column_names]
    if missing:
        raise StageError(f"{source}: missing column(s) {', '.join(missing)} (expected id, prompt, chosen)")
    if table.num_rows == 0:
        raise StageError(f"{source}: no rows; the fidelity check needs at least one held-out prompt")
    rows = table.sort_by("id").slice(0, n).select(["prompt", "chosen"]).to_pylist()
    return [r["prompt"] + r["chosen"] for r in rows]


def fidelity_stats(reference: list, candidate: list) -> dict[str, float]:
    """Max and mean absolute per-token log-prob difference over all scored tokens of all texts."""
    import torch

    if len(reference) != len(candidate) or not reference:
        raise ValueError("fidelity_stats needs the same, non-zero number of sequences on both sides")
    diffs = torch.cat([(r.double() - c.double()).abs() for r, c in zip(reference, candidate, strict=True)])
    return {"max_abs": float(diffs.max()), "mean_abs": float(diffs.mean()), "tokens": int(diffs.numel())}


def fidelity_violations(stats: dict[str, float], m: Any) -> list[str]:
    """Human-readable reasons the gate fails (empty: it passes)."""
    problems = []
    if not stats["max_abs"] <= m.fidelity_max_abs:
        problems.append(f"max |diff| {stats['max_abs']:.3g} > merge.fidelity_max_abs {m.fidelity_max_abs:g}")
    if not stats["mean_abs"] <= m.fidelity_mean_abs:
        problems.append(
            f"mean |diff| {stats['mean_abs']:.3g} > merge.fidelity_mean_abs {m.fidelity_mean_abs:g}"
        )
    return problems


def data_metadata(schema_metadata: dict[bytes, bytes] | None) -> dict[str, str]:
    """The prepare stage's `dpo.*` Parquet schema metadata as plain strings (prefix dropped)."""
    out = {}
    for key, value in (schema_metadata or {}).items():
        name = key.decode("utf-8", "replace")
        if name.startswith(DATA_META_PREFIX):
            out[name[len(DATA_META_PREFIX) :]] = value.decode("utf-8", "replace")
    return out


def _table(rows: dict[str, Any]) -> str:
    if not rows:
        return "_not recorded_\n"
    lines = ["| key | value |", "| --- | --- |"]
    for key, value in sorted(rows.items()):
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines) + "\n"


def model_card(info: dict[str, Any]) -> str:
    """models/merged/README.md from what the merge knows. Deterministic: no dates, no host names.

    `info` keys: base (pipeline_base.json), data (train.parquet metadata), adapter (adapter_config.json
    subset), train_params / train_metrics (train_summary.json), merge (params merge section + seed),
    fidelity (metrics/merge.json numbers), adapter_sha256, chat_template_sha.
    """
    base = info.get("base", {})
    base_name = base.get("name") or "unknown base model"
    source = base.get("source", "")
    revision = base.get("revision", "")
    train_params = info.get("train_params") or {}
    train_metrics = info.get("train_metrics") or {}
    return (
        "---\n"
        f"base_model: {json.dumps(base_name)}\n"
        "library_name: transformers\n"
        "tags: [dpo, lora, merged, chatml]\n"
        "---\n\n"
        f"# {base_name} + DPO (merged)\n\n"
        "A LoRA adapter trained with DPO (QLoRA: 4-bit NF4 base) on preference pairs, folded into the "
        f"unquantized base weights in {info['merge']['merge.dtype']}. Prompts use ChatML "
        "(`<|im_start|>role\\n...<|im_end|>`); generation ends at `<|im_end|>` (eos).\n\n"
        "## Base model\n\n"
        + _table({"name": base_name, "source": source, "revision": revision or "(none)", **_rest(base)})
        + "\n## Data\n\nFrom the Parquet schema metadata of data/prepared/train.parquet (prepare stage). The "
        "tokenize stage then drops the rows over the length limits (`data.max_prompt_length`, `data.max_length`); "
        "metrics/tokens.json has the rows trained on.\n\n"
        + _table(info.get("data", {}))
        + "\n## Training\n\nAdapter (adapter_config.json):\n\n"
        + _table(info.get("adapter", {}))
        + f"\nAdapter sha256 (models/adapter): `{info.get('adapter_sha256', '')}`\n\n"
        + "Training params (models/adapter/train_summary.json):\n\n"
        + _table(flatten(train_params))
        + "\nTraining metrics (models/adapter/train_summary.json):\n\n"
        + _table(flatten(train_metrics))
        + "\n## Merge\n\n"
        + _table({**info["merge"], **{f"fidelity.{k}": v for k, v in info.get("fidelity", {}).items()}})
        + f"\nChat template sha (16 hex): `{info.get('chat_template_sha', '')}`\n\n"
        "## Scores\n\n"
        "Scored by the evaluate stage with lm-evaluation-harness: see `metrics/eval.json` (tuned, base and "
        "delta per task and metric, and their average) and `metrics/samples.json` (seeded sample answers). "
        "They are not copied into this folder: it is the merge stage's output and must not change after it.\n\n"
        "## Use\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("models/merged")\n'
        'model = AutoModelForCausalLM.from_pretrained("models/merged")\n'
        'messages = [{"role": "system", "content": "You are a helpful assistant chatbot."},\n'
        '            {"role": "user", "content": "What is a Large Language Model?"}]\n'
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)\n'
        "output = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=200)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```\n"
    )


def _rest(base: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k not in ("name", "source", "revision")}


def adapter_summary(adapter_config: dict[str, Any]) -> dict[str, Any]:
    keys = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "use_dora")
    out = {k: adapter_config[k] for k in keys if k in adapter_config}
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = sorted(out["target_modules"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Side effects


def token_logprobs(model, input_ids) -> Any:
    """log p(token_t | tokens_<t) for t >= 1 of one sequence, in float32, on the CPU."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids.unsqueeze(0)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[1:, None]).squeeze(-1).cpu()


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_adapter(adapter_dir: Path) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise StageError(f"{adapter_dir}: adapter folder not found (run the train stage first)")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise StageError(
            f"{adapter_dir}: missing {', '.join(missing)} (expected a PEFT LoRA adapter in safetensors)"
        )
    config = _read_optional_json(adapter_dir / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise StageError(
            f"{adapter_dir}/adapter_config.json: peft_type is {config.get('peft_type')!r}, expected 'LORA'"
        )
    return config


def run(
    params: Any,
    base_dir: str | Path = BASE_DIR,
    adapter_dir: str | Path = ADAPTER_DIR,
    prepared_dir: str | Path = PREPARED_DIR,
    merged_dir: str | Path = MERGED_DIR,
    metrics_path: str | Path = METRICS_DIR / "merge.json",
) -> dict[str, Any]:
    """Merge, check fidelity, publish models/merged and metrics/merge.json; returns the metrics."""
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel

    from stages import tracking
    from stages.common import load_model, load_tokenizer, resolve_device, torch_dtype

    m = params.merge
    base_dir, adapter_dir, prepared_dir, merged_dir = map(
        Path, (base_dir, adapter_dir, prepared_dir, merged_dir)
    )
    require_safetensors(base_dir)
    adapter_config = _check_adapter(adapter_dir)
    test_file, train_file = prepared_dir / "test.parquet", prepared_dir / "train.parquet"
    if not test_file.is_file():
        raise StageError(f"{test_file}: held-out test split not found (run the prepare stage first)")
    texts = fidelity_texts(pq.read_table(test_file), m.fidelity_prompts, str(test_file))
    data_meta = data_metadata(pq.read_schema(train_file).metadata) if train_file.is_file() else {}
    train_summary = _read_optional_json(adapter_dir / TRAIN_SUMMARY)
    base_info = _read_optional_json(base_dir / BASE_INFO)
    # The adapter folder carries the tokenizer it was trained with; fall back to the base's.
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base_dir)
    adapter_sha = sha256_tree(adapter_dir)
    train_run_id = str(train_summary.get("mlflow_run_id") or "")

    dtype = torch_dtype(m.dtype)
    device = resolve_device(m.device)
    torch.manual_seed(params.seed)

    with tracking.stage_run(
        "merge",
        params,
        sections=["seed", "merge"],
        inputs={"base": base_dir, "adapter": adapter_dir, "prepared": prepared_dir},
        tags={"lineage.train_run_id": train_run_id} if train_run_id else None,
    ):
        encoded = [
            tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(device)
            for t in texts
        ]
        # Unquantized base in merge.dtype (see the module docstring for why not the 4-bit one).
        base_model = load_model(base_dir, dtype=dtype, device_map={"": device})  # straight onto the device
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

            merge_section = {
                "seed": params.seed,
                **{f"merge.{k}": v for k, v in params.section("merge").items()},
            }
            info = {
                "base": base_info,
                "data": data_meta,
                "adapter": adapter_summary(adapter_config),
                "adapter_sha256": adapter_sha,
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
                    "adapter_sha256": adapter_sha,
                    "train_run_id": train_run_id,
                    "base": base_info,
                    "dtype": m.dtype,
                    "chat_template_sha": info["chat_template_sha"],
                },
            )
        write_json(metrics_path, metrics)
        tracking.set_tags({"lineage.adapter.sha256": adapter_sha})
        tracking.log_outputs({"merged": merged_dir})
    return metrics


def main() -> None:
    from stages import common, config

    def _run() -> None:
        params = config.load()
        common.pin_single_device(params.merge.device)  # one GPU on a multi-GPU host
        run(params)

    common.run_main(_run)


if __name__ == "__main__":
    main()
