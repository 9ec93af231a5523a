"""The evaluation tasks: tasks/ YAMLs, which of them read the pipeline's held-out split, lm-eval's registry."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError

# Set when every task lives in tasks/: nothing then needs the hub, so nothing may reach it.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# The tasks/ YAMLs whose documents are the pipeline's own held-out split (see tasks/heldout.py).
HELDOUT_DATASET = re.compile(r"^custom_dataset:\s*!function\s+heldout\.load_prepared_test\s*$", re.M)


def _task_yamls(tasks_dir: str | Path) -> dict[str, str]:
    """{task name: YAML text} for tasks/ (read with a regex: the YAMLs use lm-eval's !function tag)."""
    found = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        match = re.search(r"^task:\s*([\w.-]+)\s*$", text, re.M)
        if match:
            found[match.group(1)] = text
    return found


def local_task_names(tasks_dir: str | Path) -> set[str]:
    """Task names defined by the YAMLs in tasks/."""
    return set(_task_yamls(tasks_dir))


def heldout_task_names(tasks_dir: str | Path) -> set[str]:
    """The tasks/ tasks whose documents come from data/prepared (heldout.load_prepared_test)."""
    return {name for name, text in _task_yamls(tasks_dir).items() if HELDOUT_DATASET.search(text)}


def task_manager(names: list[str], tasks_dir: str | Path, prepared_dir: str | Path) -> tuple[Any, set[str]]:
    """(lm-eval's TaskManager for the eval.tasks `names`, the names tasks/ defines). tasks/ is always indexed,
    lm-eval's own registry (hundreds of folders, ~15 s) only when a task needs it, and the offline switches
    are set when every task lives in tasks/. prepared_dir reaches tasks/heldout.py's custom_dataset through
    the task metadata. StageError names any task neither knows."""
    local = local_task_names(tasks_dir)
    all_local = all(name in local for name in names)
    if all_local:
        os.environ.update(OFFLINE_ENV)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(tasks_dir),
        include_defaults=not all_local,
        metadata={"prepared_dir": str(Path(prepared_dir).resolve())},
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise StageError(
            f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)} (not in {tasks_dir}/ nor lm-eval's registry)"
        )
    return manager, local
