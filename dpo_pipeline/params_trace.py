"""A read-recording view of the params dataclasses: the evidence of tests/e2e/test_dag_params.py.

config.load() hands one out when DPO_PARAMS_TRACE is set (never otherwise); code that needs the dataclass
itself (dataclasses.asdict in lineage.params_for) takes it back with plain(). A module of its own, below
both config and tracking, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Traced:
    """A read-only view of a params dataclass that records every dotted key read through it.

    Sections come back as views too; a leaf (number, string, list) is recorded where it is read. Only made by
    load() when TRACE_ENV is set; `plain()` gives the dataclass back (for dataclasses.asdict and friends).
    """

    __slots__ = ("_inner", "_path", "_reads")

    def __init__(self, inner: Any, path: str, reads: set[str]):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in {f.name for f in dataclasses.fields(self._inner)}:
            return value  # a method such as Params.section: it reads the dataclass itself
        key = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return Traced(value, key, self._reads)
        self._reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __repr__(self) -> str:
        return f"Traced({self._inner!r})"


def plain(params: Any) -> Any:
    """The params dataclass behind a Traced view (or `params` itself)."""
    return object.__getattribute__(params, "_inner") if isinstance(params, Traced) else params
