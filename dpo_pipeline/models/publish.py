"""What `make publish` uploads: the hub-ready folder (the merged model or the adapter, its tokenizer) and the
model card a hub user expects, from what the pipeline recorded. No network here; tools/publish.py uploads."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.models.merge import METHOD_REFERENCE, markdown_table, method_name

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import DataParams

KINDS = {"merged": Path("models/merged"), "adapter": Path("models/adapter")}
# Files of a model folder that are the pipeline's own bookkeeping, not the model: left out of the upload.
PRIVATE_FILES = ("train_summary.json",)


def base_license(base_dir: Path) -> str | None:
    """The `license:` of the base's own model card (its README.md YAML header), when it has one."""
    card = base_dir / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    header = re.match(r"---\n(.*?)\n---", text, re.S)
    if not header:
        return None
    found = re.search(r"^license:\s*(\S+)\s*$", header.group(1), re.M)
    return found.group(1).strip("'\"") if found else None


def hub_license(name: str, revision: str) -> str | None:
    """The license on a hub model's card at `revision` (the base stage takes weights and tokenizer files only,
    not the card): asked of the hub when publishing; None offline or when the card states none."""
    try:
        from huggingface_hub import model_info

        card_data = model_info(name, revision=revision or None).card_data
    except Exception:  # noqa: BLE001 - offline, unreachable, gated: the card simply has no license line then
        return None
    value = getattr(card_data, "license", None) if card_data is not None else None
    return value if isinstance(value, str) and value else None


def dataset_ids(data: DataParams, raw_dvc: Path | None) -> list[str]:
    """The hub datasets the training data came from: `data.hub_name` when read from the hub, or the dataset a
    `dvc import-url` of a huggingface.co/datasets/... file records."""
    if data.source == "hub":
        return [data.hub_name]
    if raw_dvc is not None and raw_dvc.is_file():
        found = re.search(r"huggingface\.co/datasets/([\w.-]+/[\w.-]+)/", raw_dvc.read_text(encoding="utf-8"))
        if found:
            return [found.group(1)]
    return []


def yaml_header(fields: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def card(kind: str, repo_id: str, info: dict[str, Any]) -> str:
    """The model card: the hub's YAML header, how the model was trained, its evaluation, how to load it."""
    base_name = info["base_name"]
    params = info.get("train_params", {})
    method = str(params.get("method", "dpo"))
    short, long = method_name(params)
    header = yaml_header(
        {
            "base_model": base_name,
            "base_model_relation": "adapter" if kind == "adapter" else "finetune",
            "datasets": info["datasets"],
            "library_name": "peft" if kind == "adapter" else "transformers",
            "license": info.get("license"),
            "pipeline_tag": "text-generation",
            "tags": [method, "trl", "qlora", "lora", "chatml", "dvc", "dpo-pipeline"],
        }
    )
    what = (
        f"The LoRA adapter of a {short} run on {base_name} (load it on the base with peft)"
        if kind == "adapter"
        else f"{base_name} with a {short}-trained LoRA adapter folded into its weights ({info.get('dtype', '')})"
    )
    lineage = {
        "git commit": info["git_commit"],
        "artifact (DVC md5 in dvc.lock)": f"{info['artifact_path']} {info['artifact_md5']}",
        "training data (data/prepared, DVC md5)": info.get("prepared_md5", ""),
        "raw data": info.get("raw_source", ""),
        "raw data hash": info.get("raw_data_hash", ""),
        "pairs trained on (data/pairs)": info.get("pairs_trained", ""),
        "MLflow train run": f"stage train, tag output.adapter.sha256 = {info['adapter_sha256']}"
        if info.get("adapter_sha256")
        else "",
    }
    load = (
        "```python\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # downloads the base too\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        if kind == "adapter"
        else "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", torch_dtype="auto")\n'
    ) + (
        'messages = [{"role": "system", "content": "You are a helpful assistant chatbot."},\n'
        '            {"role": "user", "content": "What is a Large Language Model?"}]\n'
        "# the ChatML chat template ships with the tokenizer: <|im_start|>role\\n...<|im_end|>\n"
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)\n'
        "output = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=200)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```\n"
    )
    return (
        header
        + f"\n# {repo_id}\n\n{what}. Made by a reproducible DVC pipeline: every figure below can be traced to "
        "the data, parameters and code in the git commit it names.\n\n"
        f"## Training\n\n{long} (trl, `train.method: {method}`) of a QLoRA adapter (peft + bitsandbytes 4-bit), "
        f"{METHOD_REFERENCE.get(method, 'see train.method')}.\n\n"
        + markdown_table(lineage)
        + "\nTraining parameters (params.yaml `train`):\n\n"
        + markdown_table(params)
        + "\n"
        + (info.get("evaluation") or "## Evaluation\n\nNot evaluated (metrics/eval_card.md not found).\n")
        + "\n## How to use\n\n"
        + load
    )


def build_folder(source: Path, out_dir: Path, card_text: str) -> Path:
    """`out_dir` holding the model files of `source` (hard links where the disk allows: no second copy of
    the weights) and README.md = the card; written to a temporary sibling and renamed into place."""
    from dpo_pipeline.io import atomic_dir

    if not source.is_dir():
        raise StageError(f"{source}: not found (run `make repro` first)")
    with atomic_dir(out_dir) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_dir() or path.name in PRIVATE_FILES or path.name == "README.md":
                continue
            try:
                os.link(path, tmp / path.name)
            except OSError:
                shutil.copy2(path, tmp / path.name)
        (tmp / "README.md").write_text(card_text, encoding="utf-8")
    return out_dir
