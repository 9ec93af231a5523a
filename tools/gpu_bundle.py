"""Packages for a bare GPU machine: trl, bitsandbytes and lm-eval at the locked versions, trimmed to < 64 MiB.

    python -m tools.gpu_bundle DIR     (make gpu-bundle)

The GPU machine this project is lent has torch (CUDA 13), transformers, peft, accelerate and pyarrow, and no
network. `pip install --no-deps --target DIR` takes the three packages (and lm-eval's small pure-Python
dependencies that such an image lacks) at constraints.txt's versions; then bitsandbytes keeps only its CUDA 13
library (its folder holds one per CUDA version, 125 MB in all) and lm-eval drops its task folders (the GPU
check runs our local tasks in tasks/). Prints the bundle's size and fails above the limit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tools.lock_check import read_pins

PACKAGES = ("trl", "bitsandbytes", "lm-eval", "sqlitedict", "pytablewriter", "word2number", "more-itertools",
            "evaluate", "jsonlines", "dataproperty", "mbstrdecoder", "typepy", "tabledata", "tcolorpy",
            "pathvalidate", "chardet")  # fmt: skip
LIMIT_BYTES = 64 * 2**20
KEEP_CUDA = "cuda130"


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def trim(target: Path) -> None:
    for lib in (target / "bitsandbytes").glob("libbitsandbytes_*"):
        if KEEP_CUDA not in lib.name:
            lib.unlink()
    tasks = target / "lm_eval" / "tasks"
    for entry in tasks.iterdir() if tasks.is_dir() else []:
        if entry.is_dir() and entry.name != "__pycache__":
            shutil.rmtree(entry)
    for cache in target.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


MARKER = ".gpu-bundle"  # a file inside a bundle this tool made: the only kind of folder it will replace


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.gpu_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=".gpu-bundle", help="where to write the bundle (replaced)")
    target = Path(parser.parse_args(argv).dir)
    if target.exists() and not (target / MARKER).is_file():
        print(
            f"error: {target} exists and is not a bundle this tool made (no {MARKER} inside): not replacing it",
            file=sys.stderr,
        )
        return 1
    pins = read_pins()
    wanted = [f"{name}=={pins[name]}" for name in PACKAGES if name in pins]
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *wanted],
        check=True,
    )
    trim(target)
    (target / MARKER).write_text("made by tools/gpu_bundle.py\n")
    total = size(target)
    print(f"gpu-bundle: {target} holds {len(wanted)} packages, {total / 2**20:.1f} MiB (limit 64 MiB)")
    return 0 if total <= LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
