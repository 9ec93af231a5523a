"""Join a multi-node train run as a node other than node 0 (`make train-worker`; docs/scaling.md).

1. `-S key=value` (optional, repeatable): the same params edits node 0 ran with (`dvc exp run -S ...`), applied
   to params.yaml by DVC's own override code, so that every node trains on the same params (the train stage
   checks that all processes agree before the first step).
2. `dvc repro --pull <the stages that write train's inputs>`: unchanged stages are pulled from the DVC remote,
   changed ones restored from the remote's run cache (node 0's `dvc push --run-cache`) or, where node 0 has not
   pushed them, run here (their outputs are byte-identical on every machine). The code is in git.
3. `python -m stages.train --worker`: takes this node's rank and node 0's address from the environment
   (NODE_RANK + MASTER_ADDR, Slurm or SkyPilot) and joins node 0's torchrun / accelerate rendezvous.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml


def _outs(spec: dict) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in spec.get("outs", [])]


def _within(dep: str, out: str) -> bool:
    """`dep` is the output `out` or a path inside it."""
    return dep == out or dep.startswith(out + "/")


def _stages(dvc_yaml: str | Path) -> dict:
    return yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]


def _inputs(stages: dict, stage: str) -> list[str]:
    outs = [out for name, spec in stages.items() if name != stage for out in _outs(spec)]
    return [dep for dep in stages[stage]["deps"] if any(_within(dep, out) for out in outs)]


def train_inputs(dvc_yaml: str | Path = "dvc.yaml", stage: str = "train") -> list[str]:
    """The deps of `stage` that another stage of dvc.yaml writes (or a folder holding such an output)."""
    return _inputs(_stages(dvc_yaml), stage)


def input_stages(dvc_yaml: str | Path = "dvc.yaml", stage: str = "train") -> list[str]:
    """The stages whose outputs `stage` reads, in dvc.yaml's order."""
    stages = _stages(dvc_yaml)
    inputs = _inputs(stages, stage)
    return [
        name
        for name, spec in stages.items()
        if name != stage and any(_within(dep, out) for out in _outs(spec) for dep in inputs)
    ]


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")  # the venv's dvc, with or without an activated venv
    return str(beside) if beside.exists() else "dvc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml edit, as `dvc exp run -S` takes it (give node 0's edits to every node)",
    )
    parser.add_argument(
        "--no-pull", action="store_true", help="the inputs are already here: do not dvc repro"
    )
    parser.add_argument(
        "--print-inputs", action="store_true", help="list train's inputs and stages, then exit"
    )
    args = parser.parse_args(argv)
    if args.print_inputs:
        print("\n".join(train_inputs()))
        print("stages: " + " ".join(input_stages()))
        return 0
    if args.overrides:
        from dvc.utils.hydra import apply_overrides

        apply_overrides("params.yaml", args.overrides)  # the code `dvc exp run -S` runs
        print(f"train-worker: params.yaml edited: {' '.join(args.overrides)}", file=sys.stderr)
    if not args.no_pull:
        argv = [_dvc(), "repro", "--pull", *input_stages()]
        print(f"train-worker: {' '.join(argv[1:])}", file=sys.stderr)
        if subprocess.run(argv, check=False).returncode != 0:
            print(
                "error: train-worker could not pull or reproduce train's inputs (see above)", file=sys.stderr
            )
            return 1
    return subprocess.run([sys.executable, "-m", "stages.train", "--worker"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
