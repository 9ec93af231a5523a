"""compare_methods: run each preference method as a DVC experiment and print one table side by side.

    python -m tools.compare_methods [--runs tools/compare_methods.yaml] [--only NAME ...] [--table-only]

Reads: the run list (--runs; `make compare-methods` uses tools/compare_methods.yaml): experiment name -> `-S`
overrides of params.yaml. Runs, for each entry in order, `dvc exp run --temp -n methods-<name> -S key=value ...`
on the committed workspace (a temporary copy: the workspace and its params.yaml are left as they are; stages
whose deps and params did not change come from DVC's cache, so the dpo entry of an up-to-date pipeline re-runs
nothing). An existing experiment of the same name on the same commit is replaced. MLflow runs are recorded in the
workspace's store (MLFLOW_TRACKING_URI, else this repo's mlflow.db: the temporary copy's own would be deleted).
--table-only runs nothing and tabulates the experiments already there.

Writes: DVC experiments (git refs under refs/exps, shown by `dvc exp show`); prints a Markdown table:
held-out preference accuracy of the merged model with its paired standard error against the base and the delta,
the eval reward margin in each method's own units (ORPO's log odds ratio next to it), the mean generated answer length in tokens,
train seconds and peak memory. The figures come from each experiment's committed metrics/eval.json and
metrics/train.json and metrics/train_timing.json. Exit status: 0 with a table; 1 when a run fails (its dvc output is shown) or an experiment
is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dpo_pipeline.errors import StageError
from dpo_pipeline.runner import run_main

DEFAULT_RUNS = Path("tools/compare_methods.yaml")
PREFIX = "methods-"


def load_runs(path: Path) -> dict[str, dict[str, Any]]:
    try:
        runs = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StageError(f"{path}: cannot read the run list: {err}") from err
    if not isinstance(runs, dict) or not runs:
        raise StageError(
            f"{path}: expected a mapping of experiment name -> {{param: value}}, got {type(runs).__name__}"
        )
    for name, overrides in runs.items():
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise StageError(f"{path}: entry {name!r}: expected a mapping of params.yaml keys to values")
    return {str(name): overrides for name, overrides in runs.items()}


def flow(value: Any) -> str:
    """A value in YAML flow style, which is what DVC's -S parses (lists as [a, b])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a scalar dumps as "value\n...\n"


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={flow(value)}")]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def experiment_ref(name: str, baseline: str) -> str | None:
    """The ref of experiment `name` on commit `baseline` (refs/exps/<sha[:2]>/<sha[2:]>/<name>), or None."""
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    found = _git("for-each-ref", "--format=%(refname)", ref)
    return ref if found else None


def run_experiment(name: str, overrides: dict[str, Any], env: dict[str, str]) -> None:
    exp = PREFIX + name
    baseline = _git("rev-parse", "HEAD")
    if experiment_ref(exp, baseline):
        subprocess.run(["dvc", "exp", "remove", exp], check=True, env=env, capture_output=True)
    command = ["dvc", "exp", "run", "--temp", "-n", exp, *set_param_args(overrides)]
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-6000:])
        raise StageError(f"experiment {exp} failed (dvc exp run exit {done.returncode}); its output is above")


def read_run_figures(ref: str) -> dict[str, float]:
    """metrics/train_timing.json at `ref` (timings and peak memory, kept out of the DVC metrics), or {} for an
    experiment made before that file existed."""
    try:
        return read_metrics(ref, "metrics/train_timing.json")
    except StageError:
        return {}


def read_metrics(ref: str, path: str) -> dict[str, float]:
    try:
        return json.loads(_git("show", f"{ref}:{path}"))
    except subprocess.CalledProcessError as err:
        raise StageError(f"{ref}: no {path} in the experiment ({err.stderr.strip()})") from err


def _num(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table_row(
    name: str, overrides: dict[str, Any], evaluation: dict[str, float], train: dict[str, float]
) -> str:
    acc = evaluation.get("dpo_heldout_pref/acc")
    err = evaluation.get("dpo_heldout_pref/acc_delta_stderr")
    delta = evaluation.get("dpo_heldout_pref/acc_delta")
    margin_text = _num(train.get("eval_rewards_margins"), 3)
    if "eval_log_odds_chosen" in train:  # ORPO: the log odds ratio of chosen over rejected, its own margin
        margin_text += f" (log-odds {_num(train['eval_log_odds_chosen'], 3)})"
    settings = ", ".join(f"{k.removeprefix('train.')}={flow(v)}" for k, v in overrides.items())
    cells = [
        f"`{name}`",
        settings,
        f"{_num(acc, 3)} ± {_num(err, 3)}",
        f"{'+' if delta and delta > 0 else ''}{_num(delta, 3)}",
        margin_text,
        _num(evaluation.get("chatml_format/length_mean_tokens"), 1),
        _num(train.get("train_runtime_s"), 1),
        _num(train.get("peak_memory_mb"), 0),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| method | overrides | held-out pref. acc ± paired s.e. | vs base | eval reward margin | answer tokens (mean)"
    " | train s | peak memory MB |\n|---|---|---|---|---|---|---|---|"
)


def tabulate(runs: dict[str, dict[str, Any]]) -> str:
    baseline = _git("rev-parse", "HEAD")
    rows = []
    base_acc = None
    for name, overrides in runs.items():
        ref = experiment_ref(PREFIX + name, baseline)
        if ref is None:
            raise StageError(
                f"no experiment {PREFIX + name} on {baseline[:7]}: run without --table-only first"
            )
        evaluation = read_metrics(ref, "metrics/eval.json")
        base_acc = evaluation.get("dpo_heldout_pref/acc_base", base_acc)
        train = {**read_metrics(ref, "metrics/train.json"), **read_run_figures(ref)}
        rows.append(table_row(name, overrides, evaluation, train))
    footer = f"\nBase model's held-out preference accuracy: {_num(base_acc, 3)}. Commit {baseline[:7]}."
    return "\n".join([HEADER, *rows]) + footer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.compare_methods", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run and tabulate these entries only")
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing; tabulate existing experiments"
    )
    args = parser.parse_args(argv)

    def go() -> None:
        runs = load_runs(args.runs)
        if args.only:
            unknown = sorted(set(args.only) - set(runs))
            if unknown:
                raise StageError(f"{args.runs}: no entry {', '.join(unknown)} (entries: {', '.join(runs)})")
            runs = {name: runs[name] for name in args.only}
        env = dict(os.environ)
        env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
        if not args.table_only:
            for name, overrides in runs.items():
                run_experiment(name, overrides, env)
        print(tabulate(runs))

    run_main(go)


if __name__ == "__main__":
    main()
