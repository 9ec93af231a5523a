"""Small helpers shared by the stages: atomic outputs, hashing, JSON metrics, safe model loading.

Nothing here reads params or talks to the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The canonical output locations. dvc.yaml names the same paths; stage main()s pass these to run().
BASE_DIR = Path("models/base")
PREPARED_DIR = Path("data/prepared")
TOKENIZED_DIR = Path("data/tokenized")
PAIRS_DIR = Path("data/pairs")
REFERENCE_DIR = Path("data/reference")
ADAPTER_DIR = Path("models/adapter")
MERGED_DIR = Path("models/merged")
METRICS_DIR = Path("metrics")
SCRATCH_DIR = Path(".scratch")  # gitignored + dvcignored: checkpoints and other resumable state

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class StageError(RuntimeError):
    """An expected, user-facing failure: main() prints the message and exits non-zero, no traceback."""


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success it replaces `path` in one rename.

    On an exception the temporary directory is removed and `path` is untouched, so a crash leaves either
    the old output or none, never half of a new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete temporary siblings left by a writer that was killed (SIGKILL skips every cleanup).

    Only one writer per output runs at a time (DVC's repo lock), so any temp sibling seen here is dead;
    for a 7B merged model each one is ~14.5 GB.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
    for leftover in stale:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Pretty, key-sorted JSON written atomically (small enough for git, stable for diffs)."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a directory's relative paths and file contents (order-independent of walk)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def template_hash(chat_template: str | None) -> str:
    """Short, stable identity of a chat template (recorded with data, models and scores)."""
    return sha256_bytes((chat_template or "").encode("utf-8"))[:16]


def require_safetensors(model_dir: str | Path) -> None:
    """Refuse a model folder whose weights are not safetensors (pickle weights can run code on load)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise StageError(f"{model_dir}: model folder not found (run the stage that produces it first)")
    files = {p.name for p in model_dir.iterdir()}
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(n for n in files if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if pickles:
        raise StageError(
            f"{model_dir}: holds only pickle weights ({', '.join(pickles)}); expected *.safetensors. "
            "Pickle files can execute code when loaded, so they are refused."
        )
    raise StageError(f"{model_dir}: no *.safetensors weights found")


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with a model folder (never the hub)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.chat_template is None:
        raise StageError(f"{model_dir}: tokenizer has no chat template (expected ChatML)")
    return tokenizer


def load_model(model_dir: str | Path, **kwargs: Any):
    """A causal LM from a local folder: safetensors only, no remote code, never the hub."""
    from transformers import AutoModelForCausalLM

    require_safetensors(model_dir)
    kwargs.setdefault("trust_remote_code", False)
    with weights_read_not_mapped():
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, **kwargs
        )


@contextlib.contextmanager
def weights_read_not_mapped():
    """Inside: transformers reads safetensors shards with pread instead of memory-mapping them.

    On Linux transformers maps every shard for the whole load, so all of a checkpoint's pages count as
    resident until the load ends, on top of the (4-bit) model being built: loading the bench's 0.6B model
    in 4-bit peaks at ~2.7 GB RSS mapped, ~1.5 GB read (bench/, `large_*_load_peak_rss_mb`). pread is the
    backend transformers itself uses on Windows and MPS; the loaded tensors are bit-identical (tested).
    transformers 5.x has no option for it, so its module-level `safe_open` is swapped for the duration
    (restored after, also on errors); where that name is gone, loading is unchanged.
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:
        yield
        return

    def pread_open(filename, framework="pt", device="cpu", backend="mmap"):
        return original(filename, framework=framework, device=device, backend="pread")

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def one_visible_gpu(visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a single-process stage: the first device of what the user made visible.

    unset -> "0"; "2,3" -> "2"; "GPU-1a2b,GPU-3c4d" -> "GPU-1a2b"; "" (none visible) stays "". On a host with
    several GPUs, the Trainer sets n_gpu to the visible count for a model placed on one device and wraps it in
    nn.DataParallel, which trl refuses; lm-eval and the merge would spread or pick devices of their own.
    """
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return first


def pin_single_device(device: str, env: dict[str, str] | None = None) -> str | None:
    """Before any CUDA call, make a single-process stage on `device` ("cuda", "cpu" or "auto") see one GPU.

    Returns the CUDA_VISIBLE_DEVICES it set, or None when the stage runs on the CPU (nothing to pin). Stages
    started by torchrun / accelerate (LOCAL_RANK set) are left alone: there each process owns GPU LOCAL_RANK.
    """
    env = os.environ if env is None else env
    if device == "cpu" or "LOCAL_RANK" in env:
        return None
    env["CUDA_VISIBLE_DEVICES"] = one_visible_gpu(env.get("CUDA_VISIBLE_DEVICES"))
    return env["CUDA_VISIBLE_DEVICES"]


def resolve_device(device: str) -> str:
    """A params device ("cpu", "cuda", "auto") -> "cpu" or "cuda" ("auto" picks CUDA when it is available)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def run_main(fn, *args: Any) -> None:
    """Run a stage entry point: StageError / ConfigError become one clear line on stderr and exit 1."""
    from stages.config import ConfigError

    try:
        fn(*args)
    except (StageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys ({"lora": {"r": 16}} -> {"lora.r": 16})."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}
