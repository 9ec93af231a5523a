"""Helpers for the offline lm-eval tasks in this folder (referenced from the YAMLs with `!function`).

Both tasks read the prepared held-out split, data/prepared/test.parquet (columns id, system, question,
prompt, chosen, rejected, ...), written by the prepare stage. `prompt` is ChatML ending in
"<|im_start|>assistant\\n"; `chosen` / `rejected` are the answers ending in "<|im_end|>\\n".

Where the file is: the evaluate stage passes `prepared_dir` (an absolute path) through lm-eval's
TaskManager metadata, which lm-eval hands to `custom_dataset` as keyword arguments. Without it (e.g. the
`lm_eval` CLI run from the repo root with `--include_path tasks`) the default `data/prepared` relative to
the working directory is used, which is where `dvc repro` runs.

The rows are read with pyarrow into an in-memory `datasets.Dataset` (no HF datasets cache is written),
sorted by `id`, so `limit` always picks the same documents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DEFAULT_PREPARED_DIR = "data/prepared"
TEST_FILE = "test.parquet"
REQUIRED_COLUMNS = ("id", "prompt", "chosen", "rejected")

# What is left of a new ChatML turn once special tokens are stripped from the decoded text
# ("<|im_start|>user\n" decodes to "user\n"), plus the markers themselves written out as plain text.
_MARKUP = re.compile(r"<\|im_(start|end)\|>|(^|\n)(system|user|assistant)\n")


def load_prepared_test(prepared_dir: str = DEFAULT_PREPARED_DIR, **_metadata: Any):
    """`custom_dataset` for the held-out tasks: {"test": Dataset} from <prepared_dir>/test.parquet."""
    import datasets
    import pyarrow.parquet as pq

    path = Path(prepared_dir) / TEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out test split not found (run the prepare stage first)")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(REQUIRED_COLUMNS)}"
        )
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows; the held-out tasks need at least one")
    table = table.sort_by("id").replace_schema_metadata(None)
    return datasets.DatasetDict({"test": datasets.Dataset(table)})


def preference_choices(doc: dict[str, Any]) -> list[str]:
    """[chosen, rejected], verbatim as DPO saw them (target index 0 = chosen)."""
    return [doc["chosen"], doc["rejected"]]


def answer_format(answer: str) -> dict[str, float]:
    """Per-answer ChatML format checks on a generation (special tokens already stripped by lm-eval).

    nonempty: the answer has visible text. no_markup: it holds no ChatML markers written as text and does
    not run on into a new turn header. format_ok: both. The generation itself stops at <|im_end|> (the
    tokenizer's eos) or at a new "<|im_start|>", see chatml_format.yaml.
    """
    nonempty = float(bool(answer.strip()))
    no_markup = float(_MARKUP.search(answer) is None)
    return {"format_ok": nonempty * no_markup, "nonempty": nonempty, "no_markup": no_markup}


def chatml_format_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """`process_results` of chatml_format: one generation per document."""
    return answer_format(results[0])
