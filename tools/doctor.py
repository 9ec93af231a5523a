"""What this machine can run: torch build and devices, bf16, bitsandbytes, disk, hub access.

Usage: python -m tools.doctor [params file]   (make doctor). Prints one line per fact, then what the params
file (default params.yaml) asks for that this machine lacks. Reads HF_TOKEN's presence, never its value.
Exit code 0 when the params can run here, 1 when something they ask for is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# A 7B recipe run keeps the base and the merged model in models/ (and, with cache.type reflink/symlink/hardlink,
# not a second time in .dvc/cache), plus the hub snapshot in the Hugging Face cache: see README "GPU runs".
RECIPE_DISK_GB = {
    "hub cache": 14.5,
    "models/base": 14.5,
    "models/merged": 14.5,
    "adapter+data+checkpoints": 2.0,
}


def facts() -> dict[str, str]:
    import torch

    out = {
        "python": sys.version.split()[0],
        "torch": f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out[f"cuda:{i}"] = (
                f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
            )
        out["bf16"] = str(torch.cuda.is_bf16_supported())
        out["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset: all)")
    else:
        out["bf16"] = "CPU only (bf16 autocast on CPU is slow; the small profile trains in fp32)"
    try:
        import bitsandbytes
        from bitsandbytes.cextension import BNB_BACKEND

        out["bitsandbytes"] = f"{bitsandbytes.__version__}, backend {BNB_BACKEND}"
    except Exception as err:  # noqa: BLE001 - reported, not raised: this command only looks
        out["bitsandbytes"] = f"not usable ({type(err).__name__}: {err})"
    free = shutil.disk_usage(Path.cwd()).free / 2**30
    out["free disk here"] = (
        f"{free:.0f} GiB (a 7B recipe run needs about {sum(RECIPE_DISK_GB.values()):.0f} GiB)"
    )
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    out["HF_HOME"] = hf_home
    out["HF_TOKEN"] = "set" if os.environ.get("HF_TOKEN") else "not set (public repos only)"
    out["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "0")
    return out


def missing_for(params) -> list[str]:
    """What `params` asks for that this machine lacks."""
    import torch

    lacks = []
    wants_cuda = params.train.device == "cuda" or params.eval.device == "cuda"
    if wants_cuda and not torch.cuda.is_available():
        lacks.append("train.device / eval.device is cuda, but torch sees no CUDA device")
    if params.train.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        lacks.append("train.precision is bf16, but this GPU has no bf16")
    if params.train.optim.startswith("paged_") and not torch.cuda.is_available():
        lacks.append(f"train.optim {params.train.optim} needs CUDA")
    if (
        params.train.num_processes > 1
        and wants_cuda
        and torch.cuda.device_count() < params.train.num_processes
    ):
        lacks.append(
            f"train.num_processes is {params.train.num_processes}, {torch.cuda.device_count()} GPU(s) visible"
        )
    if params.base.source == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        lacks.append(
            "base.source is hub and HF_HUB_OFFLINE=1: the snapshot must already be in HF_HOME's cache"
        )
    return lacks


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dpo_pipeline import config

    parser = argparse.ArgumentParser(
        prog="python -m tools.doctor", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "params", nargs="?", default=config.PARAMS_FILE, help="params file to check (params.yaml)"
    )
    path = parser.parse_args(argv).params
    for key, value in facts().items():
        print(f"{key:>22}: {value}")
    try:
        params = config.load(path)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lacks = missing_for(params)
    for line in lacks:
        print(f"{'missing':>22}: {line}")
    print(f"{'verdict':>22}: {path} {'cannot run here' if lacks else 'can run here'}")
    return 1 if lacks else 0


if __name__ == "__main__":
    sys.exit(main())
