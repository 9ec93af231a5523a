"""The stage runner: how a stage script's main() reports failures."""

from __future__ import annotations

import sys
from typing import Any

from dpo_pipeline.errors import StageError


def run_main(fn, *args: Any) -> None:
    """Run a stage entry point: StageError / ConfigError become one clear line on stderr and exit 1."""
    from dpo_pipeline.config import ConfigError

    try:
        fn(*args)
    except (StageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
