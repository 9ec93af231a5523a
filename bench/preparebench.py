"""Prepare and tokenize on orca-sized data, measured in a fresh process (imports timed apart from the work).

    python -m bench.preparebench MODE --raw ROWS.jsonl --base DIR --params JSON --work DIR --out JSON

MODE
  ours      the prepare stage's own functions on the raw file, phase by phase: tokenizer load, read and
            validate (read_local), prepare_table (filters, ChatML formatting, split),
            data_metrics, write_prepared. No MLflow run.
  article   the article's way: datasets.load_dataset("json") then Dataset.map with a Python chatml_format
            calling tokenizer.apply_chat_template per row (formatting only: no validation, filters or split).
  tokenize  the tokenize stage's work (dpo_pipeline.data.tokens.tokenize_split on both splits: trl's ids, length
            limits, int32 columns) against what trl 1.16's DPOTrainer._prepare_dataset does to the same
            strings, row by row through Dataset.map, inside every train run and the reference pass when it
            is handed text (the article's way); on the raw file's rows as prepare keeps them, at the recipe's
            length limits (recipes/neuralhermes-2.5.yaml data.max_prompt_length / max_length: the 7B run's
            rows; the small profile's limits keep few orca-sized rows). Fails if the tokenize stage's ids differ
            from trl's in any column.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dpo_pipeline.data import prepare as prepare_lib  # noqa: E402
from dpo_pipeline.data import raw, tokens  # noqa: E402
from dpo_pipeline.models import loading  # noqa: E402
from dpo_pipeline.train import dpo  # noqa: E402

MODES = ("ours", "article", "tokenize")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "neuralhermes-2.5.yaml"


def _ours(args, params) -> dict:
    clock = time.perf_counter()
    import pyarrow as pa
    import transformers  # noqa: F401 - load_tokenizer imports it lazily: count it as an import
    from transformers import AutoTokenizer  # noqa: F401

    from dpo_pipeline import io
    from dpo_pipeline.models.loading import load_tokenizer

    pa.array([""])  # pyarrow imports pandas lazily on its first array: an import, counted as one
    out: dict = {"import_s": time.perf_counter() - clock}

    work = time.perf_counter()
    clock = work
    tokenizer = load_tokenizer(args.base)
    out["tokenizer_load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    table, _schema = raw.read_local(args.raw, params.data.format)
    out["read_validate_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    train, test, counts = prepare_lib.prepare_table(table, tokenizer, params.data)
    out["prepare_table_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    metrics = prepare_lib.data_metrics(train, test, counts)
    out["metrics_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    target = args.work / "prepared"
    target.mkdir(parents=True, exist_ok=True)
    io.write_prepared(target, train, test, {"bench": "1"})
    out["write_s"] = time.perf_counter() - clock
    out["work_s"] = time.perf_counter() - work
    out["rows_in"] = metrics["rows_in"]
    out["rows_out"] = metrics["rows_out"]
    return out


def _article(args, params) -> dict:
    clock = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    out: dict = {"import_s": time.perf_counter() - clock}
    datasets.disable_progress_bars()
    work = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(args.base), local_files_only=True)

    # The article's function, verbatim but for the tokenizer argument.
    def chatml_format(example):
        # Format system
        if len(example["system"]) > 0:
            message = {"role": "system", "content": example["system"]}
            system = tokenizer.apply_chat_template([message], tokenize=False)
        else:
            system = ""

        # Format instruction
        message = {"role": "user", "content": example["question"]}
        prompt = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

        # Format chosen answer
        chosen = example["chosen"] + "<|im_end|>\n"

        # Format rejected answer
        rejected = example["rejected"] + "<|im_end|>\n"

        return {
            "prompt": system + prompt,
            "chosen": chosen,
            "rejected": rejected,
        }

    clock = time.perf_counter()
    dataset = datasets.load_dataset(
        "json", data_files=str(args.raw), split="train", cache_dir=str(args.work / "hf-datasets")
    )
    out["load_s"] = time.perf_counter() - clock
    original_columns = dataset.column_names
    clock = time.perf_counter()
    dataset = dataset.map(chatml_format, remove_columns=original_columns)
    out["map_s"] = time.perf_counter() - clock
    out["work_s"] = time.perf_counter() - work
    out["rows_out"] = dataset.num_rows
    return out


def _tokenize(args, params) -> dict:
    clock = time.perf_counter()
    import dataclasses
    import types

    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    from trl import DPOTrainer

    from dpo_pipeline import config

    out: dict = {"import_s": time.perf_counter() - clock}
    datasets.disable_progress_bars()
    recipe = config.load(RECIPE).data
    data = dataclasses.replace(
        params.data, max_prompt_length=recipe.max_prompt_length, max_length=recipe.max_length
    )
    params = dataclasses.replace(params, data=data)
    tokenizer = loading.load_tokenizer(args.base)
    eos = tokenizer.eos_token
    table, _schema = raw.read_local(args.raw, data.format)
    splits = prepare_lib.prepare_table(table, tokenizer, data)[:2]
    out["rows_in"] = sum(split.num_rows for split in splits)

    clock = time.perf_counter()
    tokenized = [tokens.tokenize_split(split, tokenizer, data) for split in splits]
    out["ours_s"] = time.perf_counter() - clock
    kept = pa.concat_tables([t for t, _counts in tokenized])
    out["rows"] = kept.num_rows
    out["tokens"] = sum(pc.sum(v).as_py() for v in tokens.token_lengths(kept).values())

    # trl on the same strings (the rows tokenize kept, so trl's max_length filter drops none).
    texts = pa.concat_tables([tokens.trl_texts(split, eos) for split in splits])
    texts = texts.filter(pc.is_in(texts["id"], value_set=kept["id"]))
    trainer_args = dpo.dpo_config(params, args.work / "ckpt")
    clock = time.perf_counter()
    theirs = DPOTrainer._prepare_dataset(
        types.SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset(texts), tokenizer, trainer_args, "bench"
    )
    out["trl_s"] = time.perf_counter() - clock
    for name in tokens.IDS_COLUMNS:
        if list(theirs[name]) != kept.column(name).to_pylist():
            raise SystemExit(f"stages.tokenize's {name} differs from trl's _prepare_dataset")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--raw", required=True, type=Path)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")

    from bench.trainbench import load_params

    params = load_params(args.params)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"ours": _ours, "article": _article, "tokenize": _tokenize}[args.mode](args, params)
    result["process_s"] = time.perf_counter() - STARTED
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(result, sort_keys=True), file=sys.stderr)


if __name__ == "__main__":
    main()
