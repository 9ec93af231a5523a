"""The stage runner: one set-up of every stage's output, and how a stage script's main() reports failures.

Output (setup_output, called by run_main before the stage's work, so no stage configures logging itself):
- Python logging at INFO on stderr, `name: message` (with `[rank N] ` in front under torchrun / accelerate);
  transformers' own logger at WARNING (TRANSFORMERS_VERBOSITY, read when transformers is imported).
- Progress bars (tqdm: the Trainer's, datasets' maps, lm-eval's requests) only on a terminal, one bar per
  long step. When stderr is a file or pipe (CI, `dvc repro > log`) they are switched off (TQDM_DISABLE,
  HF_DATASETS_DISABLE_PROGRESS_BARS), so a log holds lines, not a wall of carriage-return updates; training
  still logs a line per `train.logging_steps`.
- Known noise, explained once here instead of printed every time: bitsandbytes' CPU backend logs "Failed to
  load CPU gemm_4bit_forward from kernels-community" on every load when the optional `kernels` package (a
  faster CPU 4-bit kernel from the hub) is absent; its own fallback then runs, with identical results. That
  message is dropped; any other bitsandbytes message still shows.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dpo_pipeline.errors import StageError

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOISE = "from kernels-community"
# (category, message regex) of library warnings we cannot fix (see the module docstring).
DEPRECATIONS = ((FutureWarning, r"`is_gradient_checkpointing` is deprecated"),)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def setup_output(stream: Any = None) -> None:
    """Logging, progress bars and known noise for one stage process (see the module docstring)."""
    stream = stream if stream is not None else sys.stderr
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=logging.INFO, format=f"{prefix}%(name)s: %(message)s", stream=stream, force=True
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (hasattr(stream, "isatty") and stream.isatty()):
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    for category, message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
    noisy = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in noisy.filters):
        noisy.addFilter(_DropMessage(BNB_KERNELS_NOISE))


class RowProgress:
    """Progress over a long pass through rows, off a terminal: a line at each tenth with rows done/total and the
    ETA (on a terminal the library's own tqdm bar shows instead, so nothing is printed). For loops we do not own
    (trl's reference pass): the caller adds the rows of each batch as it sees them."""

    def __init__(self, label: str, total: int, stream: Any = None):
        import time

        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = not os.environ.get("TQDM_DISABLE")  # a terminal: tqdm's bar is the progress
        self.started, self.next_tenth = time.perf_counter(), 1

    def add(self, rows: int) -> None:
        import time

        self.done += rows
        if self.quiet:
            return
        while self.next_tenth <= 10 and self.done * 10 >= self.total * self.next_tenth:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(
                f"{self.label}: {min(self.done, self.total)}/{self.total} rows ({self.next_tenth * 10}%) | "
                f"{elapsed:.0f}s elapsed, eta {eta:.0f}s",
                file=self.stream,
                flush=True,
            )
            self.next_tenth += 1


def summary(stage: str, text: str) -> None:
    """The one line a stage ends with: what it did (rows in/out, pairs scored, fidelity vs its gate, scores)."""
    print(f"{stage}: {text}", file=sys.stderr, flush=True)


def run_main(fn, *args: Any) -> None:
    """Run a stage entry point after setup_output: StageError / ConfigError become one clear line on stderr
    and exit 1."""
    from dpo_pipeline.config import ConfigError

    setup_output()
    try:
        fn(*args)
    except (StageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
