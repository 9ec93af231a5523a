"""Training comparison of one model size: the reference stage, our train path and the article's baseline,
each in its own subprocess (bench.trainbench), on the same base model, rows, params and number of steps.

The rows: the profile's raw sample through the prepare and tokenize stages' own functions (with the model's
tokenizer and params `data`): the first `rows` kept rows as the train split (see compare) and one batch as
the test split (the reference stage always scores both splits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import merge_repeats, training_metrics
from dpo_pipeline.data import prepare as prepare_lib
from dpo_pipeline.data import raw, tokens

REPO = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """A benchmark worker failed; the message names its log file."""


def bench_params(
    params: Any, steps: int, batch_size: int, device: str, gradient_checkpointing: bool | None = None
) -> Any:
    """The profile's params with the bench's steps, batch size and device; no checkpoint during the run.

    gradient_checkpointing: None keeps the profile's `train.gradient_checkpointing`; True / False sets it.
    The params are those of both sides (ours and the baseline), so an override never favours one of them.
    """
    t = params.train
    train = dataclasses.replace(
        t,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        warmup_steps=min(t.warmup_steps, max(steps // 2, 0)),
        save_steps=max(t.save_steps, steps + 1),
        logging_steps=min(t.logging_steps, steps),
        device=device,
        gradient_checkpointing=(
            t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        ),
    )
    return dataclasses.replace(params, train=train)


def params_json(params: Any, path: Path) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(params), indent=1) + "\n", encoding="utf-8")
    return path


def prepared_rows(params: Any, base_dir: Path, out_dir: Path, n_train: int, n_test: int) -> dict[str, int]:
    """data/prepared-like and data/tokenized-like Parquet for the bench (out_dir/prepared, out_dir/tokenized):
    the first n_train / n_test rows of the raw sample that prepare and tokenize keep, the same rows in both
    (the article's side trains on the prepared strings, ours on the tokenize stage's ids of them)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dpo_pipeline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    table, _schema = raw.read_local(Path(params.data.path), params.data.format)
    train, _test, _counts = prepare_lib.prepare_table(table, tokenizer, params.data)
    tokenized, _dropped = tokens.tokenize_split(train, tokenizer, params.data)
    if tokenized.num_rows < n_train + n_test:
        raise BenchError(
            f"{params.data.path}: {tokenized.num_rows} tokenized train rows, the bench needs {n_train + n_test}"
        )
    # The test split is taken from the train rows too, so both splits have what the bench asks for.
    splits = {"train": tokenized.slice(0, n_train), "test": tokenized.slice(n_train, n_test)}
    for name in ("prepared", "tokenized"):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        texts = train.filter(pc.is_in(train["id"], value_set=rows["id"]))
        order = pc.index_in(rows["id"], value_set=texts["id"])
        pq.write_table(texts.take(order), out_dir / "prepared" / f"{split}.parquet")
        pq.write_table(rows, out_dir / "tokenized" / f"{split}.parquet")
    return {"train": n_train, "test": n_test}


def worker_env(tokenizers_parallelism: bool = False) -> dict[str, str]:
    """The workers' environment. Training workers run as the train and reference stages do, with
    TOKENIZERS_PARALLELISM=false; prepare workers keep the Rust tokenizer's threads, as `dvc repro` runs the
    prepare stage (stages/prepare.py does not turn them off)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        DISABLE_MLFLOW_INTEGRATION="TRUE",
    )
    if tokenizers_parallelism:
        env.pop("TOKENIZERS_PARALLELISM", None)
    else:
        env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_worker(
    module: str, mode: str, args: list[str], out: Path, log: Path, tokenizers_parallelism: bool = False
) -> dict[str, Any]:
    """Run `python -m module mode args --out out` in a fresh process; its JSON result plus `wall_s`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", module, mode, *args, "--out", str(out)],
            cwd=REPO,
            env=worker_env(tokenizers_parallelism),
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        raise BenchError(f"{module} {mode} exited {proc.returncode}; log {log}:\n{tail}")
    result = json.loads(out.read_text(encoding="utf-8"))
    result["wall_s"] = wall
    return result


def compare(
    size: str,
    base_dir: Path,
    params: Any,
    steps: int,
    batch_size: int,
    device: str,
    work: Path,
    repeats: int = 1,
    rows: int | None = None,
    gradient_checkpointing: bool | None = None,
    log=print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat metrics, raw worker results) of ours vs the baseline at one size, each side run `repeats`
    times (report.merge_repeats keeps the fastest run's figures and the highest memory peaks).

    gradient_checkpointing: for both sides alike (None: the profile's setting); see bench_params.

    rows: size of the train split (at least steps x batch x accumulation). Length-grouped batching sorts
    mega-batches of min(50, rows // (4 x batch)) batches, so a split of only the trained rows groups far
    worse than the stage's real split does; 200 x batch rows gives the full 50-batch mega-batches. The
    reference worker scores every row of the split, as the reference stage does.
    """
    work = work / size
    work.mkdir(parents=True, exist_ok=True)
    p = bench_params(params, steps, batch_size, device, gradient_checkpointing)
    trained = steps * batch_size * p.train.gradient_accumulation_steps
    n_train = max(rows or 0, trained)
    prepared_rows(p, base_dir, work, n_train, batch_size)
    params_path = params_json(p, work / "params.json")
    common = ["--params", str(params_path), "--base", str(base_dir)]
    common += ["--prepared", str(work / "prepared"), "--tokenized", str(work / "tokenized")]
    common += ["--reference", str(work / "reference")]
    runs: dict[str, list[dict[str, Any]]] = {"reference": [], "ours": [], "baseline": []}
    # The reference once; then ours and the baseline alternately (ours first, then baseline first, ...), so
    # a burst of load from other processes does not land on one side only.
    order = ["reference"]
    for repeat in range(repeats):
        order += ["ours", "baseline"] if repeat % 2 == 0 else ["baseline", "ours"]
    for mode in order:
        n = len(runs[mode])
        tag = mode if n == 0 else f"{mode}-{n + 1}"
        log(f"  {size}: {tag} ...")
        r = run_worker("bench.trainbench", mode, common, work / f"{tag}.json", work / "logs" / f"{tag}.log")
        runs[mode].append(r)
        what = f"train loop {r['train_s']:.1f} s" if "train_s" in r else f"compute {r['compute_s']:.1f} s"
        log(f"  {size}: {tag} done in {r['wall_s']:.1f} s (peak RSS {r['peak_rss_mb']:.0f} MB, {what})")
    results = {mode: merge_repeats(found) for mode, found in runs.items()}
    metrics = training_metrics(size, results["ours"], results["baseline"], results["reference"])
    metrics[f"{size}_batch_size"] = batch_size
    metrics[f"{size}_gradient_checkpointing"] = float(p.train.gradient_checkpointing)
    metrics[f"{size}_split_rows"] = n_train
    return metrics, runs
