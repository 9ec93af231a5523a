"""Atomic writes, JSON and Parquet metadata helpers, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError

# How a library reports a failed write when it is not an OSError (safetensors' Rust I/O errors).
_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "(os error ")


def write_failure(path: Path, err: BaseException) -> StageError | None:
    """One line for a write that failed for lack of space or any OS error: the output path, the cause and the
    free space on its disk (None when `err` is no write failure: it propagates as it is)."""
    if isinstance(err, StageError) or (
        not isinstance(err, OSError) and not any(mark in str(err) for mark in _WRITE_FAILURES)
    ):
        return None
    cause = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    return StageError(
        f"{path}: writing it failed ({cause}; {free}); the previous output, if any, is unchanged and no "
        "partial file was left"
    )


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
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            old = _temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as err:
        failure = write_failure(path, err)
        if failure is None:
            raise
        raise failure from None
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
    except OSError as err:
        raise write_failure(path, err) from None
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


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level with dotted keys ({"lora": {"r": 16}} -> {"lora.r": 16})."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def parquet_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    from dpo_pipeline.layout import DATA_META_PREFIX

    return {f"{DATA_META_PREFIX}{key}".encode(): str(value).encode() for key, value in meta.items()}


def write_prepared(out_dir: Path, train, test, meta: dict[str, Any]) -> None:
    """data/prepared/{train,test}.parquet (zstd) with `meta` and the split name in the schema metadata."""
    import pyarrow.parquet as pq

    for name, table in (("train", train), ("test", test)):
        table = table.replace_schema_metadata(parquet_metadata({**meta, "split": name}))
        pq.write_table(table, out_dir / f"{name}.parquet", compression="zstd")
