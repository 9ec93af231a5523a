"""Join a multi-node train run as a node other than node 0 (`make train-worker`; docs/scaling.md).

Fetches exactly the inputs the train stage reads from the DVC remote (`dvc pull` of train's deps that other
stages produce: models/base, data/tokenized, data/pairs/*, data/reference, data/prepared; the code is in git),
then runs `python -m stages.train --worker`, which takes this node's rank and node 0's address from the
environment (NODE_RANK + MASTER_ADDR, Slurm or SkyPilot) and joins node 0's torchrun / accelerate rendezvous.
Node 0 runs `dvc repro` (and `dvc push` of the stages before train, so that the workers find their inputs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml


def train_inputs(dvc_yaml: str | Path = "dvc.yaml", stage: str = "train") -> list[str]:
    """The deps of `stage` that another stage of dvc.yaml writes (or a folder holding such an output)."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
    outs = set()
    for name, spec in stages.items():
        if name == stage:
            continue
        for entry in spec.get("outs", []):
            outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    deps = stages[stage]["deps"]
    return [dep for dep in deps if dep in outs or any(dep.startswith(out + "/") for out in outs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--no-pull", action="store_true", help="the inputs are already here: do not dvc pull")
    parser.add_argument("--print-inputs", action="store_true", help="list train's inputs and exit")
    args = parser.parse_args(argv)
    inputs = train_inputs()
    if args.print_inputs:
        print("\n".join(inputs))
        return 0
    if not args.no_pull:
        print(f"train-worker: dvc pull {' '.join(inputs)}", file=sys.stderr)
        beside = Path(sys.executable).with_name("dvc")  # the venv's dvc, with or without an activated venv
        pulled = subprocess.run([str(beside) if beside.exists() else "dvc", "pull", *inputs], check=False)
        if pulled.returncode != 0:
            print(
                "error: dvc pull of train's inputs failed; has node 0 pushed them (dvc push)?",
                file=sys.stderr,
            )
            return pulled.returncode
    return subprocess.run([sys.executable, "-m", "stages.train", "--worker"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
