"""What `make publish` uploads: the hub-ready folder (the merged model or the adapter, its tokenizer) and the
model card a hub user expects, from what the pipeline recorded. No network here; tools/publish.py uploads."""

from __future__ import annotations

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
# Files of a model folder that are the pipeline's own bookkeeping, not the model: left out of the upload (the
# lineage they hold is in the card and in the repo).
PRIVATE_FILES = ("train_summary.json", "pipeline_merge.json")

# The DPO paper, cited by every card (the method the pipeline is built around; SimPO/ORPO/KTO runs cite it too).
DPO_CITATION = """@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and Manning, Christopher D.
               and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""
# What the offline held-out tasks are, for the card's model-index (the hub shows them by these names).
TASK_DATASETS = {
    "dpo_heldout_pref": "held-out preference pairs (data/prepared/test.parquet)",
    "chatml_format": "held-out prompts, answer format (data/prepared/test.parquet)",
}
# The metrics of eval.json per task that the card's model-index reports (the tuned model's value): each task's
# main figure; the leaderboard tasks report lm-eval's own metric names.
CARD_METRICS = ("acc", "acc_norm", "format_ok", "exact_match", "mc2")


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


def eval_results(scores: dict[str, Any]) -> list[Any]:
    """The tuned model's figures of eval.json as huggingface_hub EvalResults (the hub's model-index schema)."""
    from huggingface_hub import EvalResult

    out = []
    for key, value in sorted(scores.items()):
        task, _, metric = key.partition("/")
        if not metric or metric not in CARD_METRICS or not isinstance(value, (int, float)):
            continue
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=task,
                dataset_name=TASK_DATASETS.get(task, task),
                dataset_split="test" if task in TASK_DATASETS else None,
                metric_type=metric,
                metric_value=round(float(value), 4),
                metric_name=f"{task} {metric}",
            )
        )
    return out


def card_header(kind: str, repo_id: str, info: dict[str, Any]) -> str:
    """The card's YAML header, built by huggingface_hub's own ModelCardData (model-index from the scores)."""
    from huggingface_hub import ModelCardData

    method = str(info.get("train_params", {}).get("method", "dpo"))
    builtin = info.get("base_source") == "builtin"
    data = ModelCardData(
        model_name=repo_id,
        # A builtin base is not a hub model: naming it as base_model would point the hub at nothing.
        base_model=None if builtin else info["base_name"],
        base_model_relation=None if builtin else ("adapter" if kind == "adapter" else "finetune"),
        datasets=info["datasets"] or None,
        language=info.get("language") or None,
        library_name="peft" if kind == "adapter" else "transformers",
        license=info.get("license") or "other",
        pipeline_tag="text-generation",
        tags=[method, "trl", "qlora", "lora", "dvc", "dpo-pipeline"],
        eval_results=eval_results(info.get("scores") or {}) or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def card(kind: str, repo_id: str, info: dict[str, Any]) -> str:
    """The model card: the hub's YAML header (model-index included), what the model is and is not for, how it was
    trained (with the framework versions), its evaluation, how to load it, the citation."""
    base_name = info["base_name"]
    params = info.get("train_params", {})
    method = str(params.get("method", "dpo"))
    short, long = method_name(params)
    header = card_header(kind, repo_id, info)
    builtin = info.get("base_source") == "builtin"
    base_label = (
        f"the pipeline's builtin demo model {base_name} (a {info.get('parameter_count', 0) / 1e6:.1f}M-parameter "
        "Mistral-architecture model made locally by the base stage, not a hub model)"
        if builtin
        else base_name
    )
    what = (
        f"The LoRA adapter of a {short} run on {base_label} (load it on the base with peft)"
        if kind == "adapter"
        else f"{base_label} with a {short}-trained LoRA adapter folded into its weights ({info.get('dtype', '')})"
    )
    use = (
        "A demonstration of the pipeline on its small offline profile: it shows that every stage runs and every "
        "figure is traceable. Its answers are not meant to make sense; do not use it for anything else."
        if builtin
        else f"Chat and instruction following in the style of the preference data it was tuned on, as "
        f"{base_name} is used. Preference tuning moves the model toward the chosen answers of its training pairs: "
        "it inherits their biases and blind spots and those of the base, it is not a safety-tuned model, and "
        "its scores below are measured on the benchmarks named, nothing else. Check it on your own task before "
        "relying on it."
    )
    license_note = (
        ""
        if info.get("license")
        else "\nLicense: the base states none the pipeline could read (`license: other`); set it with "
        "`python -m tools.publish --license`.\n"
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
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")  # downloads the base too\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        if kind == "adapter"
        else "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")\n'
    ) + (
        'messages = [{"role": "system", "content": "You are a helpful assistant chatbot."},\n'
        '            {"role": "user", "content": "What is a Large Language Model?"}]\n'
        "# the chat template ships with the tokenizer\n"
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)\n'
        "output = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=200)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```\n"
    )
    versions = {k.removeprefix("version."): v for k, v in (info.get("versions") or {}).items()}
    quantized = (
        "QLoRA adapter (peft + bitsandbytes 4-bit)"
        if params.get("load_in_4bit", True)
        else "LoRA adapter (peft)"
    )
    return (
        header
        + f"\n# {repo_id}\n\n{what}. Made by a reproducible DVC pipeline: every figure below can be traced to "
        "the data, parameters and code in the git commit it names.\n\n"
        + f"## Intended use and limitations\n\n{use}\n{license_note}\n"
        + f"## Training procedure\n\n{long} (trl, `train.method: {method}`) of a {quantized}, "
        f"{METHOD_REFERENCE.get(method, 'see train.method')}.\n\n"
        + markdown_table(lineage)
        + "\nTraining parameters (params.yaml `train`):\n\n"
        + markdown_table(params)
        + ("\nFramework versions:\n\n" + markdown_table(versions) if versions else "")
        + "\n"
        + (info.get("evaluation") or "## Evaluation\n\nNot evaluated (metrics/eval_card.md not found).\n")
        + "\n## How to use\n\n"
        + load
        + f"\n## Citation\n\n```bibtex\n{DPO_CITATION}\n```\n"
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
