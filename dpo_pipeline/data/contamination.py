"""n-gram overlap between the training rows and the evaluation tasks' documents (the decontaminate stage).

As lm-eval's own decontamination: text is normalised (lowercased, every run of characters that are not letters
or digits a word break) and split into words; a training row overlaps a task when one of its n-grams (13 words
by default, `decontamination.ngram`) is also an n-gram of one of the task's documents. A training row's text is
its question and both answers (not the system prompt: the same few instructions open thousands of orca rows
and would match every document that quotes them). A document's text is what lm-eval shows the model and what it
scores: doc_to_text plus the target or every choice.

An n-gram that is in more than `decontamination.common_rows` training rows is boilerplate (FLAN's templates,
"Options: - yes - no ..."), not leaked content, and is not counted; the report says how many were left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

_WORD = re.compile(r"[^\W_]+")
# ChatML's markup in a prompt (a turn's start with its role, a turn's end) is format, not content.
_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)?|<\|im_end\|>")


def words(text: str) -> list[str]:
    """Normalised words: ChatML markup dropped, lowercase, split at every character not a letter or digit."""
    return _WORD.findall(_CHATML.sub(" ", text).lower())


def ngrams(tokens: Sequence[str], n: int) -> Iterator[str]:
    """Each n-word window of `tokens`, as one string."""
    return (" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def ngram_hashes(tokens: Sequence[str], n: int) -> set[int]:
    """hash() of each n-word window (in-process membership only, so Python's per-process hash is fine)."""
    return {hash(gram) for gram in ngrams(tokens, n)}


TRAINING_FIELDS = ("history", "question", "chosen", "rejected")  # history: the earlier user/assistant turns


def row_texts(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) of a training row: each earlier turn on its own (no n-gram runs from one turn into the
    next), the question, both answers."""
    return [("history", t) for t in row.get("history", [])] + [
        (k, str(row[k])) for k in TRAINING_FIELDS if k != "history"
    ]


def text_ngrams(texts: Iterable[str], n: int) -> set[int]:
    """The n-grams of several texts, each on its own (no n-gram runs from one field into the next)."""
    out: set[int] = set()
    for text in texts:
        out |= ngram_hashes(words(text), n)
    return out


def document_texts(task: Any, doc: dict[str, Any]) -> list[str]:
    """What lm-eval shows and scores for one document: its text, and its target or each choice."""
    parts = [str(task.doc_to_text(doc))]
    if task.config.output_type == "multiple_choice":
        parts.extend(str(c) for c in task.doc_to_choice(doc))
    else:
        target = task.doc_to_target(doc)
        parts.extend(str(t) for t in (target if isinstance(target, list) else [target]))
    return parts


def task_documents(names: Sequence[str], tasks_dir, prepared_dir) -> dict[str, list[list[str]]]:
    """{eval task: the text of each of its evaluation documents}, read through lm-eval's task registry (tasks/
    and, for any other name, lm-eval's own tasks with their hub datasets), a group's sub-tasks together."""
    from dpo_pipeline.evaluate.tasks import task_manager

    manager, _local = task_manager(list(names), tasks_dir, prepared_dir)
    out: dict[str, list[list[str]]] = {}
    for name in names:
        texts: list[list[str]] = []
        for task in manager.load([name])["tasks"].values():
            texts.extend(document_texts(task, doc) for doc in task.eval_docs)
        out[name] = texts
    return out


def longest_text(texts: list[list[str]]) -> int:
    """The most words any one text of a task's documents has (an n-gram never spans two texts)."""
    return max((len(words(part)) for parts in texts for part in parts), default=0)


def require_measurable(documents: dict[str, list[list[str]]], n: int) -> list[str]:
    """Refuse an n-gram length longer than every document of every task (overlap could never be found, and the
    report would say "no contamination" about nothing); the one-line warnings for single tasks whose texts
    are all shorter than `n`."""
    from dpo_pipeline.errors import StageError

    longest = {task: longest_text(texts) for task, texts in documents.items()}
    if longest and max(longest.values()) < n:
        raise StageError(
            f"decontamination.ngram: expected at most {max(longest.values())} words (the longest text of any eval "
            f"task's documents), got {n}: no overlap could ever be found"
        )
    return [
        f"warning: decontamination.ngram {n} is longer than every text of task {task} (longest {m} words): its "
        "overlap cannot be measured and is reported as 0"
        for task, m in sorted(longest.items())
        if m < n
    ]


def overlaps(
    rows: Sequence[dict[str, Any]],
    documents: dict[str, list[list[str]]],
    n: int,
    common_rows: int,
    examples: int,
) -> tuple[dict[str, Any], set[str]]:
    """(report, ids of overlapping training rows) for training `rows` (dicts with id, question, chosen,
    rejected) against each task's document texts."""
    from collections import Counter

    row_grams = [text_ngrams((text for _field, text in row_texts(r)), n) for r in rows]
    frequency = Counter(g for grams in row_grams for g in grams)
    common = {g for g, count in frequency.items() if count > common_rows}
    report: dict[str, Any] = {
        "ngram": n,
        "rows_train": len(rows),
        "common_ngrams_ignored": len(common),
        "tasks": {},
    }
    hit_ids: set[str] = set()
    for task, texts in documents.items():
        doc_grams: set[int] = set()
        for parts in texts:
            doc_grams |= text_ngrams(parts, n)
        doc_grams -= common
        hits = [i for i, grams in enumerate(row_grams) if not grams.isdisjoint(doc_grams)]
        report["tasks"][task] = {
            "documents": len(texts),
            "rows_overlapping": len(hits),
            "examples": [_example(rows[i], doc_grams, n) for i in hits[:examples]],
        }
        hit_ids.update(str(rows[i]["id"]) for i in hits)
    report["rows_overlapping_any_task"] = len(hit_ids)
    return report, hit_ids


def _example(row: dict[str, Any], doc_grams: set[int], n: int) -> dict[str, str]:
    for field, text in row_texts(row):
        for gram in ngrams(words(text), n):
            if hash(gram) in doc_grams:
                return {"id": str(row["id"]), "field": field, "ngram": gram}
    return {"id": str(row["id"]), "field": "", "ngram": ""}


def flat_metrics(report: dict[str, Any], dropped: int) -> dict[str, float]:
    """Numbers for `dvc metrics diff`: per task, the overlapping training rows; in all, and how many dropped."""
    out: dict[str, float] = {
        "rows_train": report["rows_train"],
        "rows_overlapping_any_task": report["rows_overlapping_any_task"],
        "dropped_contaminated": dropped,
        "common_ngrams_ignored": report["common_ngrams_ignored"],
    }
    for task, entry in report["tasks"].items():
        out[f"{task}/rows_overlapping"] = entry["rows_overlapping"]
        out[f"{task}/documents"] = entry["documents"]
    return out


def read_training_rows(prepared_dir) -> list[dict[str, Any]]:
    """id, question, chosen, rejected and `history` (the text of each earlier non-system turn of `messages`)
    of every row of data/prepared/train.parquet."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from dpo_pipeline.errors import StageError

    path = Path(prepared_dir) / "train.parquet"
    if not path.is_file():
        raise StageError(f"{path}: prepared split not found (run the prepare stage first: dvc repro prepare)")
    columns = ["id", "question", "chosen", "rejected"]
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
    with_turns = "messages" in names  # prepared splits from before multi-turn rows have no messages column
    rows = pq.read_table(path, columns=[*columns, "messages"] if with_turns else columns).to_pylist()
    for row in rows:
        turns = [m["content"] for m in row.pop("messages", []) if m["role"] != "system"]
        row["history"] = turns[:-1]  # the last turn is the question
    return rows


def filter_counts(prepared_dir) -> dict[str, Any]:
    """What the prepare stage's filters dropped ({dropped_<reason>: rows}, and per source), from the prepared
    split's metadata: the decontaminate report shows them beside the overlap it measures."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from dpo_pipeline.layout import DATA_META_PREFIX

    meta = pq.read_schema(Path(prepared_dir) / "train.parquet").metadata or {}
    out: dict[str, Any] = {}
    for key in ("dropped", "sources"):
        raw = meta.get(f"{DATA_META_PREFIX}{key}".encode())
        if raw is not None:
            out[key] = json.loads(raw)
    return out


def ids_table(ids: Iterable[str]):
    import pyarrow as pa

    return pa.table({"id": pa.array(sorted(ids), pa.string())})
