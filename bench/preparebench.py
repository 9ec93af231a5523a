"""Prepare on orca-sized data, measured in a fresh process (imports timed apart from the work).

    python -m bench.preparebench MODE --raw ROWS.jsonl --base DIR --params JSON --work DIR --out JSON

    python -m bench.preparebench ours ... --cache DIR   (the stage's token-count cache folder)

MODE
  ours      the prepare stage's own functions on the raw file, phase by phase: tokenizer load, read and
            validate (read_local), prepare_table (filters, vectorised ChatML formatting, token counts with
            the stage's token-count cache in --cache, split; token counting timed on its own),
            data_metrics, write_prepared. No MLflow run. Run it with an empty --cache folder for a first
            run (every text tokenized) and again with the same folder for a re-run (e.g. after a data.*
            param change, when DVC re-runs prepare on the same raw rows and base tokenizer).
  article   the article's way: datasets.load_dataset("json") then Dataset.map with a Python chatml_format
            calling tokenizer.apply_chat_template per row (formatting only: no validation, filters,
            token counts or split).
  tokenize  what the train and reference stages do to the prepared rows before any model work: trl 1.16's
            DPOTrainer._prepare_dataset, row by row through Dataset.map, against stages.train.tokenize_pairs
            (batched), on the raw file's rows as prepare keeps them at the recipe's length limits
            (recipes/neuralhermes-2.5.yaml data.max_prompt_length / max_length, the 7B run's rows; the small
            profile's limits keep few orca-sized rows); checks that the two give the same columns.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

MODES = ("ours", "article", "tokenize")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "neuralhermes-2.5.yaml"


def _ours(args, params) -> dict:
    clock = time.perf_counter()
    import pyarrow as pa
    import transformers  # noqa: F401 - load_tokenizer imports it lazily: count it as an import
    from transformers import AutoTokenizer  # noqa: F401

    from stages import prepare
    from stages.common import load_tokenizer

    pa.array([""])  # pyarrow imports pandas lazily on its first array: an import, counted as one
    out: dict = {"import_s": time.perf_counter() - clock}

    token_time = [0.0]
    original = prepare.token_lengths

    def timed_token_lengths(tokenizer, texts):
        start = time.perf_counter()
        try:
            return original(tokenizer, texts)
        finally:
            token_time[0] += time.perf_counter() - start

    prepare.token_lengths = timed_token_lengths
    work = time.perf_counter()
    clock = work
    tokenizer = load_tokenizer(args.base)
    out["tokenizer_load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    table, _schema = prepare.read_local(args.raw, params.data.columns)
    out["read_validate_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    formatted = prepare.format_table(table, tokenizer)
    out["format_s"] = time.perf_counter() - clock  # also inside prepare_table; timed alone for the ratio
    del formatted
    clock = time.perf_counter()
    train, test, counts = prepare.prepare_table(table, tokenizer, params.data, args.cache)
    out["prepare_table_s"] = time.perf_counter() - clock
    out["token_count_s"] = token_time[0]
    clock = time.perf_counter()
    metrics = prepare.data_metrics(train, test, counts)
    out["metrics_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    target = args.work / "prepared"
    target.mkdir(parents=True, exist_ok=True)
    prepare.write_prepared(target, train, test, {"bench": "1"})
    out["write_s"] = time.perf_counter() - clock
    out["work_s"] = time.perf_counter() - work - out["format_s"]
    out["work_without_token_count_s"] = out["work_s"] - out["token_count_s"]
    out["rows_in"] = metrics["rows_in"]
    out["rows_out"] = metrics["rows_out"]
    out["dropped_too_long"] = metrics["dropped_too_long"] + metrics["dropped_prompt_too_long"]
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
    from trl import DPOTrainer

    from stages import config, prepare, train

    out: dict = {"import_s": time.perf_counter() - clock}
    datasets.disable_progress_bars()
    recipe = config.load(RECIPE).data
    data = dataclasses.replace(
        params.data, max_prompt_length=recipe.max_prompt_length, max_length=recipe.max_length
    )
    params = dataclasses.replace(params, data=data)
    tokenizer = train.load_tokenizer(args.base)
    table, _schema = prepare.read_local(args.raw, data.columns)
    splits = prepare.prepare_table(table, tokenizer, data)[:2]
    dataset = datasets.concatenate_datasets([train.to_dataset(t, tokenizer.eos_token) for t in splits])
    trainer_args = train.dpo_config(params, args.work / "ckpt")
    out["rows"] = dataset.num_rows
    out["max_length"] = trainer_args.max_length
    clock = time.perf_counter()
    theirs = DPOTrainer._prepare_dataset(
        types.SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, trainer_args, "bench"
    )
    out["trl_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ours = train.tokenize_pairs(
        dataset, tokenizer, tokenizer.eos_token, trainer_args.max_length, trainer_args.truncation_mode
    )
    out["ours_s"] = time.perf_counter() - clock
    out["tokens"] = sum(
        sum(len(ids) for ids in ours[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    differ = [name for name in theirs.column_names if list(theirs[name]) != list(ours[name])]
    if differ or theirs.column_names != ours.column_names:
        raise SystemExit(f"tokenize_pairs differs from trl's _prepare_dataset in {differ or 'the columns'}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--raw", required=True, type=Path)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="ours: the token-count cache folder")
    parser.add_argument(
        "--prepared", type=Path, default=None, help="tokenize: the prepared folder ours wrote"
    )
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
