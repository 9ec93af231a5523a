"""A hub snapshot as models/base: allow patterns, complete shards, a fast tokenizer with the same ids."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.chatml import CHATML_TEMPLATE
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, template_hash, write_json
from dpo_pipeline.models.loading import require_safetensors

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "tokenizer*",
    "merges.txt",
    "vocab.txt",
]


HUB_IGNORE_PATTERNS = [
    "pytorch_model*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "training_args*",
]


def hub_patterns(trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for snapshot_download: weights as safetensors only; code only if trusted."""
    allow = list(HUB_ALLOW_PATTERNS) + (["*.py"] if trust_remote_code else [])
    return allow, list(HUB_IGNORE_PATTERNS)


def snapshot_files(snapshot: Path, trust_remote_code: bool) -> list[str]:
    """The files of a cached snapshot that models/base takes: the same allow/ignore patterns as the download,
    applied with huggingface_hub's own matcher (a cache filled by another tool may hold pickles too)."""
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = hub_patterns(trust_remote_code)
    names = sorted(p.name for p in snapshot.iterdir() if p.is_file())
    return list(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore))


# Probes for the saved tokenizer: a ChatML turn, a leading space, runs of spaces, a tab, non-ASCII.
TOKENIZER_PROBES = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n",
    " Hello  world\n\tdef f():\n    return 1",
    "naïve café, 日本語 🤖",
)


def require_same_ids(tokenizer, saved_dir: Path, what: str) -> None:
    """The tokenizer reloaded from what was saved must give the ids the converted one gives.

    A sentencepiece-only repo is converted by transformers at load time; what later stages read is the saved
    tokenizer.json, and a conversion that does not survive its own save/reload (seen with transformers 5 on a
    folder without config.json: the Metaspace prepend scheme changed) would silently change every id.
    """
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(saved_dir), local_files_only=True)
    for text in TOKENIZER_PROBES:
        before, after = tokenizer(text)["input_ids"], reloaded(text)["input_ids"]
        if before != after:
            raise StageError(
                f"{what}: the saved tokenizer.json encodes {text[:40]!r}... as {after[:12]} but the loaded "
                f"tokenizer as {before[:12]}; not publishing a tokenizer that changes ids"
            )


def require_complete_shards(model_dir: Path, what: str) -> None:
    """A sharded checkpoint must hold every shard its index names (a partial download fails here, clearly)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
    if missing:
        raise StageError(f"{what}: {index.name} names shard(s) that are missing: {', '.join(missing)}")


def download_snapshot(name: str, revision: str, trust_remote_code: bool) -> Path:
    """snapshot_download into the Hugging Face cache; hub failures become one clear StageError.

    The token is read by huggingface_hub from HF_TOKEN (or its login); it is never passed or printed here.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"base.name={name!r} at base.revision={revision!r}"
    allow, ignore = hub_patterns(trust_remote_code)
    try:
        return Path(
            snapshot_download(repo_id=name, revision=revision, allow_patterns=allow, ignore_patterns=ignore)
        )
    except GatedRepoError as err:
        raise StageError(
            f"{what}: the repo is gated; accept its licence on the hub and set HF_TOKEN"
        ) from err
    except RepositoryNotFoundError as err:
        raise StageError(f"{what}: repo not found on the hub (or private: set HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise StageError(f"{what}: revision not found in the repo (expected an existing commit sha)") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise StageError(
            f"{what}: the model hub is unreachable or offline mode is on (HF_HUB_OFFLINE=1) and the snapshot "
            "is not in the local Hugging Face cache. Connect to the hub (unset HF_HUB_OFFLINE) or pre-fill "
            "the cache (HF_HOME) with that revision."
        ) from err
    except OSError as err:  # connection errors (httpx/requests derive from OSError), disk full
        raise StageError(
            f"{what}: download failed, the model hub is unreachable? ({type(err).__name__}: {err})"
        ) from err


def build_from_hub(params: Params, out_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from dpo_pipeline import tracking

    b = params.base
    snapshot = download_snapshot(b.name, b.revision, b.trust_remote_code)
    require_safetensors(snapshot)
    config_file = snapshot / "config.json"
    if not config_file.is_file():
        raise StageError(f"{b.name}@{b.revision}: snapshot has no config.json")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("auto_map") and not b.trust_remote_code:
        raise StageError(
            f"{b.name}@{b.revision}: config.json needs the repo's own Python code (auto_map); refused because "
            "base.trust_remote_code is false"
        )
    with atomic_dir(out_dir) as tmp:
        for name in snapshot_files(snapshot, b.trust_remote_code):
            # The cache holds symlinks to blobs: copy the content. Only the allowed files: offline,
            # snapshot_download returns the whole cached folder, whatever else the user's cache holds.
            shutil.copyfile(snapshot / name, tmp / name)
        require_complete_shards(tmp, f"{b.name}@{b.revision}")
        tokenizer = AutoTokenizer.from_pretrained(
            str(tmp), local_files_only=True, trust_remote_code=b.trust_remote_code
        )
        template_added = tokenizer.chat_template is None
        if template_added:
            tokenizer.chat_template = CHATML_TEMPLATE
            if len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) != 1:
                print(
                    f"warning: {b.name} had no chat template; ChatML was set, but <|im_start|> is not a single "
                    "token of its tokenizer",
                    file=sys.stderr,
                )
        if not tokenizer.is_fast:
            raise StageError(
                f"{b.name}@{b.revision}: transformers loaded a slow ({type(tokenizer).__name__}) tokenizer; "
                "expected one backed by the `tokenizers` library"
            )
        # Saved once here, so models/base always holds tokenizer.json: a sentencepiece-only repo (Mistral,
        # OpenHermes: tokenizer.model, no tokenizer.json) is converted once and no later stage needs the slow
        # path or sentencepiece.
        tokenizer.save_pretrained(tmp)
        require_same_ids(tokenizer, tmp, f"{b.name}@{b.revision}")
        n_params = 0
        for weights in sorted(tmp.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    n_params += math.prod(fh.get_slice(key).get_shape())
        info = {
            "source": "hub",
            "name": b.name,
            "revision": b.revision,
            "chat_template_hash": template_hash(tokenizer.chat_template),
            "chat_template_added": template_added,
            "parameter_count": n_params,
            "pretrain_loss_initial": None,
            "pretrain_loss_final": None,
        }
        write_json(tmp / "pipeline_base.json", info)
    tracking.log_metrics({"parameter_count": n_params})
    return info
