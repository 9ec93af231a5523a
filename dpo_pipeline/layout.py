"""The data contract: output paths, splits, column and file names, metadata keys.

dvc.yaml names the same paths (tests/unit/test_dag.py checks the two agree); stage main()s pass these to run().
"""

from __future__ import annotations

from pathlib import Path

# Stage outputs, as dvc.yaml declares them.
BASE_DIR = Path("models/base")
PREPARED_DIR = Path("data/prepared")
TOKENIZED_DIR = Path("data/tokenized")
PAIRS_DIR = Path("data/pairs")
CONTAMINATION_DIR = Path("data/contamination")  # decontaminate: the training row ids tokenize drops
REFERENCE_DIR = Path("data/reference")
ADAPTER_DIR = Path("models/adapter")
MERGED_DIR = Path("models/merged")
METRICS_DIR = Path("metrics")
TASKS_DIR = Path("tasks")  # the offline lm-eval task YAMLs
VALIDATED_MARKER = Path("data/validated.txt")  # the validate stage's constant marker
SCRATCH_DIR = Path(".scratch")  # gitignored + dvcignored: checkpoints and other resumable state

SPLITS = ("train", "test")

# Files inside the outputs.
SELECTED_FILE = "selected.parquet"  # data/pairs: which pairs a run uses (split, id)
DROP_FILE = "drop.parquet"  # data/contamination: ids of the training rows to drop (empty unless dropping)
ORDER_FILE = "order.parquet"  # data/pairs: the training order (position, id)
TRAIN_SUMMARY = "train_summary.json"  # in models/adapter: the params and run-independent metrics
BASE_INFO = "pipeline_base.json"  # in models/base: where the base came from
MERGE_INFO = "pipeline_merge.json"  # in models/merged: the lineage back to the adapter (content hashes)

DATA_META_PREFIX = "dpo."  # prefix of the prepare stage's Parquet schema metadata keys
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # data/reference columns (trl's names)
TEXT_COLUMNS = ("system", "question", "chosen", "rejected")  # a raw row, whatever its schema called them
# The internal raw table every format is read into (data/formats.py): the text columns, `history` (the prompt's
# turns between the system turn and the last user turn, JSON [[role, content], ...]; "[]" for one turn) and the
# data.sources name the row came from.
RAW_COLUMNS = (*TEXT_COLUMNS, "history", "source")

# data/tokenized columns (trl's names for the ids).
IDS_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
LENGTH_COLUMN = "length"  # prompt + longer answer, in tokens: what length-grouped batching sorts on

PREPARED_COLUMNS = ("id", "prompt", "chosen", "rejected")  # data/prepared: what tokenize reads
TOKENIZED_COLUMNS = ("id", *IDS_COLUMNS, LENGTH_COLUMN)  # data/tokenized
