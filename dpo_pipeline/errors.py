"""The one error type a stage reports as a clean failure (message, non-zero exit, no traceback)."""

from __future__ import annotations


class StageError(RuntimeError):
    """An expected, user-facing failure: main() prints the message and exits non-zero, no traceback."""
