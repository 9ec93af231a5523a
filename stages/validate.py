"""validate stage: check params.yaml and the raw data before any stage touches an output.

Reads: params.yaml (the whole file), the raw data (`data.path` with `data.source: local`; every local file of
`data.sources` with `data.source: mix`), the
builtin base's corpus `base.builtin.corpus` (when `base.source: builtin`) and, for a hub base, its
config.json and tokenizer files when the pinned revision is in the Hugging Face cache (never the network).

What it checks beyond the params' own types and ranges: every raw row's structure and UTF-8 in its format;
that each quality filter can engage on its source; what prepare's content filters and split will keep (an empty split, fewer training rows than one global batch), with the
special tokens of the base's tokenizer (builtin: its fixed list; hub: the cached files, else ChatML's
markers); that each LoRA target names a linear layer of the base (its family's module names from the
config, see models.known_module_kinds; an unknown family is checked by train before it loads weights);
that a requested cuda device exists and train.num_processes fits the machine (cores or GPUs); and that
the tracking store opens (an SQLite file MLflow could not create would hang in its retries).
Writes: data/validated.txt, a constant marker that every other stage depends on.

Why a stage of its own: `dvc repro` removes a stage's outputs before it runs the stage's command, so a
stage that found bad input only after starting would leave its old outputs deleted from the workspace.
This stage runs first whenever params.yaml or the raw data change, fails in about a second with one
message naming the file, row or key and what was expected, and DVC then stops before any output is
touched or any expensive work starts. Its marker's content never changes, so a successful validation
re-runs nothing downstream by itself: each stage still re-runs only for its own deps and params.
The marker is `persist: true` in dvc.yaml, so even a failing validation leaves it in place.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.io import atomic_write_bytes
from dpo_pipeline.layout import VALIDATED_MARKER as MARKER

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

MARKER_TEXT = b"params.yaml and the raw data passed stages/validate.py\n"


def require_devices(params: Params, source: str) -> None:
    """Every `cuda` device the params ask for exists (torch is imported only when one is asked for)."""
    from dpo_pipeline.config import ConfigError

    wanted = {
        k: v
        for k, v in (
            ("train.device", params.train.device),
            ("merge.device", params.merge.device),
            ("eval.device", params.eval.device),
        )
        if v == "cuda"
    }
    if not wanted:
        return
    import torch

    if not torch.cuda.is_available():
        key = next(iter(wanted))
        raise ConfigError(
            f"{source}: {key}: expected a device this machine has, got 'cuda' (torch {torch.__version__} sees no CUDA "
            "device; use cpu or auto here, or run on a CUDA machine: make doctor)"
        )


def require_processes(params: Params, source: str) -> None:
    """train.num_processes no more than this machine can run: one worker per core on the CPU (each is a whole
    training process), one per visible GPU on CUDA. torch is imported only when several are asked for."""
    import os

    from dpo_pipeline.config import ConfigError

    n = params.train.num_processes
    if n == 1:
        return
    from dpo_pipeline.models.loading import resolve_device

    if resolve_device(params.train.device) == "cpu":
        have, what = os.cpu_count() or 1, "CPU cores"
    else:
        import torch

        have, what = torch.cuda.device_count(), "visible GPUs"
    if n > have:
        raise ConfigError(
            f"{source}: train.num_processes: expected at most the {have} {what} of this machine, got {n}"
        )


def base_facts(params: Params) -> tuple[list[str], dict[str, Any] | None, str]:
    """(special tokens, config.json, where from) of the base the params name, as far as they are known before
    the base stage runs: the builtin's from its params; a hub base's from the HF cache's pinned snapshot."""
    if params.base.source == "builtin":
        from dpo_pipeline.models.builtin import SPECIAL_TOKENS

        config = {"model_type": "mistral", "num_hidden_layers": params.base.builtin.num_hidden_layers}
        return list(SPECIAL_TOKENS), config, "base.builtin"
    import json

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(params.base.name, "config.json", revision=params.base.revision)
    if not isinstance(cached, str):
        return [], None, f"{params.base.name}@{params.base.revision} (not in the local cache)"
    from dpo_pipeline.models.loading import special_tokens_from_files

    folder = Path(cached).parent
    try:
        config = json.loads(Path(cached).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    return special_tokens_from_files(folder), config, str(folder)


def run(params_path: str | Path = "params.yaml", marker: str | Path = MARKER) -> dict[str, Any]:
    """Validate params and raw inputs; raise ConfigError/StageError on the first problem."""
    from dpo_pipeline import config

    params = config.load(params_path)
    report: dict[str, Any] = {"params": str(params_path)}
    specials, base_config, base_source = base_facts(params)
    if params.data.source != "hub":
        from dpo_pipeline.data.filters import special_texts
        from dpo_pipeline.data.prepare import check_split_sizes, combine, read_all
        from dpo_pipeline.train.pairs import global_batch

        # Every local source read whole (formats, filters, shares); hub sources are read by prepare (no network
        # here), so a mixture with one is checked for its local part only.
        reads = read_all(params.data, local_only=True)
        table, summary = combine(reads, params.data)
        report.update(raw=params.data.path, rows=summary["rows_in"], format=summary["format"])
        if len(reads) == len(config.sources(params.data)):
            # What prepare's filters and split will leave (cheap, no tokenizer): an empty split fails here.
            kept = check_split_sizes(
                table,
                params.data,
                params.data.path,
                global_batch(params.train),
                special_texts(specials),
                summary,
            )
            report.update(rows_train=kept["rows_train"], rows_test=kept["rows_test"])
    if base_config is not None:
        from dpo_pipeline.models.loading import check_target_modules, known_module_kinds

        kinds = known_module_kinds(base_config)
        if kinds is not None:
            check_target_modules(
                list(params.train.lora.target_modules), kinds, f"{params_path} ({base_source})"
            )
            report.update(lora_targets="checked")
    require_devices(params, str(params_path))
    require_processes(params, str(params_path))
    # The tracking store opens (before DVC removes any output: a store MLflow cannot create hangs in its retries).
    from dpo_pipeline import tracking

    tracking.check_store(tracking.store_uri())
    if params.base.source == "builtin" and params.base.builtin.corpus != params.data.path:
        from dpo_pipeline.data.raw import read_corpus

        corpus = params.base.builtin.corpus
        rows = read_corpus(corpus)
        report.update(corpus=corpus, corpus_rows=len(rows))
    marker = Path(marker)
    if not marker.exists() or marker.read_bytes() != MARKER_TEXT:
        atomic_write_bytes(marker, MARKER_TEXT)
    return report


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default="params.yaml", help="params file to check")
    args = parser.parse_args()
    report = run(args.params)
    print("validate: ok " + " ".join(f"{k}={v}" for k, v in report.items()))


def main() -> None:
    from dpo_pipeline.runner import run_main

    run_main(_main)


if __name__ == "__main__":
    main()
