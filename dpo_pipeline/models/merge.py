"""Merging pieces: the fidelity check, the adapter summary, the merged model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import flatten, read_json
from dpo_pipeline.layout import DATA_META_PREFIX

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import MergeParams

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


def fidelity_violations(stats: dict[str, float], m: MergeParams) -> list[str]:
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


def markdown_table(rows: dict[str, Any]) -> str:
    """Two-column Markdown table of `rows`, sorted by key (model cards: the merge stage's and publish's)."""
    if not rows:
        return "_not recorded_\n"
    lines = ["| key | value |", "| --- | --- |"]
    for key, value in sorted(rows.items()):
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines) + "\n"


# How the model cards name each `train.method` (config.METHODS; tests/unit/test_publishing.py checks the keys).
METHOD_NAMES = {
    "dpo": ("DPO", "Direct Preference Optimization"),
    "simpo": ("SimPO", "Simple Preference Optimization, reference-free"),
    "cpo": ("CPO", "Contrastive Preference Optimization, reference-free"),
    "orpo": ("ORPO", "Odds Ratio Preference Optimization, reference-free"),
    "kto": ("KTO", "Kahneman-Tversky Optimization on the pairs read unpaired"),
}
METHOD_REFERENCE = {
    "dpo": "the reference being the base with the adapter disabled",
    "simpo": "no reference model",
    "cpo": "no reference model",
    "orpo": "no reference model",
    "kto": "the reference being the base with the adapter disabled",
}


def method_name(train: dict[str, Any]) -> tuple[str, str]:
    """(short, long) name of the run's method from its `train` params, DPO's loss named when not sigmoid.

    `train` is the params.yaml train section as recorded (train_summary.json); a summary written before
    train.method existed is DPO."""
    method = str(train.get("method", "dpo"))
    short, long = METHOD_NAMES.get(method, (method, method))
    loss = train.get("loss_type", "sigmoid")
    if method == "dpo" and loss != "sigmoid":
        weights = train.get("loss_weights")
        loss_text = "+".join(loss) if isinstance(loss, list) else str(loss)
        if weights:
            loss_text += " weights " + "/".join(f"{w:g}" for w in weights)
        short, long = f"{short} ({loss_text})", f"{long}, loss {loss_text}"
    return short, long


def base_precision(train_params: dict[str, Any]) -> str:
    """How the frozen base was held during training, from the train run's params (train_summary.json)."""
    t = train_params.get("train") or {}
    if "load_in_4bit" not in t:
        return "base precision not recorded"
    if t["load_in_4bit"]:
        return f"QLoRA: 4-bit {str(t.get('bnb_4bit_quant_type', '')).upper()} base"
    return f"LoRA on the unquantized base, {t.get('precision', '')} training"


def model_card(info: dict[str, Any]) -> str:
    """models/merged/README.md from what the merge knows. Deterministic: no dates, no host names.

    `info` keys: base (pipeline_base.json), data (train.parquet metadata), adapter (adapter_config.json
    subset), train_params / train_metrics (train_summary.json), merge (params merge section + seed),
    fidelity (metrics/merge.json numbers), adapter_hash, chat_template_sha.
    """
    base = info.get("base", {})
    base_name = base.get("name") or "unknown base model"
    source = base.get("source", "")
    revision = base.get("revision", "")
    train_params = info.get("train_params") or {}
    train_metrics = info.get("train_metrics") or {}
    method = str((train_params.get("train") or {}).get("method", "dpo"))
    short, long = method_name(train_params.get("train") or {})
    return (
        "---\n"
        # a builtin base is made locally, not a hub model: no base_model to point the hub at
        + (f"base_model: {json.dumps(base_name)}\n" if source == "hub" else "")
        + "library_name: transformers\n"
        f"tags: [{method}, lora, merged]\n"
        "---\n\n"
        f"# {base_name} + {short} (merged)\n\n"
        f"A LoRA adapter trained with {long} ({base_precision(train_params)}) on preference pairs, folded into the "
        f"unquantized base weights in {info['merge']['merge.dtype']}. Prompts use the base tokenizer's own chat "
        "template (shipped with the tokenizer; its sha below); generation ends at the tokenizer's eos.\n\n"
        "## Base model\n\n"
        + markdown_table(
            {"name": base_name, "source": source, "revision": revision or "(none)", **_rest(base)}
        )
        + "\n## Data\n\nFrom the Parquet schema metadata of data/prepared/train.parquet (prepare stage). The "
        "tokenize stage then drops the rows over the length limits (`data.max_prompt_length`, `data.max_length`); "
        "metrics/tokens.json has the rows trained on.\n\n"
        + markdown_table(info.get("data", {}))
        + "\n## Training\n\nAdapter (adapter_config.json):\n\n"
        + markdown_table(info.get("adapter", {}))
        + f"\nAdapter content hash (models/adapter; md5 = DVC's, as in dvc.lock): `{info.get('adapter_hash', '')}`\n\n"
        + f"Adapter sha256 (models/adapter, pipeline's own hash): `{info.get('adapter_sha256', '')}`; the train run "
        "that made it is the MLflow run of stage `train` tagged `output.adapter.sha256` with it (its id is not "
        "written here: a re-run that reproduces the adapter must leave this folder byte-identical)\n\n"
        + "Training params (models/adapter/train_summary.json):\n\n"
        + markdown_table(flatten(train_params))
        + "\nTraining metrics (models/adapter/train_summary.json):\n\n"
        + markdown_table(flatten(train_metrics))
        + "\n## Merge\n\n"
        + markdown_table(
            {**info["merge"], **{f"fidelity.{k}": v for k, v in info.get("fidelity", {}).items()}}
        )
        + f"\nChat template sha (16 hex): `{info.get('chat_template_sha', '')}`\n\n"
        "## Scores\n\n"
        "Scored by the evaluate stage with lm-evaluation-harness: see `metrics/eval.json` (tuned, base and "
        "delta per task and metric, and their average) and `metrics/samples.json` (seeded sample answers). "
        "They are not copied into this folder: it is the merge stage's output and must not change after it.\n\n"
        "## Use\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("models/merged")\n'
        'model = AutoModelForCausalLM.from_pretrained("models/merged", dtype="auto")\n'
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


def token_logprobs(model, input_ids) -> Any:
    """log p(token_t | tokens_<t) for t >= 1 of one sequence, in float32, on the CPU."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids.unsqueeze(0)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[1:, None]).squeeze(-1).cpu()


def read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_adapter(adapter_dir: Path) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise StageError(f"{adapter_dir}: adapter folder not found (run the train stage first)")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise StageError(
            f"{adapter_dir}: missing {', '.join(missing)} (expected a PEFT LoRA adapter in safetensors)"
        )
    config = read_optional_json(adapter_dir / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise StageError(
            f"{adapter_dir}/adapter_config.json: peft_type is {config.get('peft_type')!r}, expected 'LORA'"
        )
    return config
