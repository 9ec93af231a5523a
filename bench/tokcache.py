"""Prototype of the proposed prepare speed-up: token counts cached by text hash + tokenizer identity.

The counts are a pure function of (tokenizer, text), so a cache keyed by both can never change what
prepare writes; it only skips re-tokenizing texts seen before (a re-run after a data.* param change, or a
raw file with rows added). The cache is one Parquet file per tokenizer under .scratch/ (gitignored and
dvcignored), holding (blake2b-128 of the UTF-8 text, count). A corrupt or foreign file is ignored and
rewritten. This module is what /tmp/prepare_speedup.patch puts into stages/prepare.py; bench measures it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


def tokenizer_key(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: the hash of its full serialized form (model, merges, added
    tokens, normalizer, pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def text_digests(texts: list[str]) -> list[bytes]:
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]


def read_cache(path: Path) -> dict[bytes, int]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        return dict(zip(table.column("digest").to_pylist(), table.column("tokens").to_pylist(), strict=True))
    except Exception:  # noqa: BLE001 - missing, partial or foreign cache: start empty
        return {}


def write_cache(path: Path, cache: dict[bytes, int]) -> None:
    import os
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "digest": pa.array(list(cache), pa.binary(16)),
            "tokens": pa.array(list(cache.values()), pa.int32()),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp, compression="none")
    os.replace(tmp, path)


def cached_lengths(
    count: Callable[[list[str]], list[int]], texts: list[str], cache_path: Path
) -> tuple[list[int], int]:
    """(token count of each text, how many had to be tokenized); `count` tokenizes a list of texts."""
    digests = text_digests(texts)
    cache = read_cache(cache_path)
    missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in cache}
    if missing:
        cache.update(zip(missing, count(list(missing.values())), strict=True))
        write_cache(cache_path, cache)
    return [cache[d] for d in digests], len(missing)
