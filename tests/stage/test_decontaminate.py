"""Issue 16, point 4: the decontaminate stage finds training rows that share a 13-gram with an evaluation
task's documents (planted here), leaves boilerplate alone, reports, and with the switch selects them for tokenize
to drop. The documents are read through lm-eval's task registry, as for the recipe's hub tasks."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import read_json
from stages import decontaminate
from tests.conftest import REPO, replace_params

TASKS_DIR = REPO / "tasks"
VOCAB = [f"w{i}" for i in range(5000)]
BOILERPLATE = "please read the following passage carefully and then answer the question that comes after it"


def sentence(rng: random.Random, n: int = 20) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def prepared(folder: Path, train: list[dict], test: list[dict]) -> Path:
    folder.mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        full = [
            {
                "id": r["id"],
                "system": "You are a helpful assistant who always answers in full sentences.",
                "question": r["question"],
                "prompt": f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n",
                "chosen": r["chosen"] + "<|im_end|>\n",
                "rejected": r["rejected"] + "<|im_end|>\n",
            }
            for r in rows
        ]
        pq.write_table(pa.Table.from_pylist(full), folder / f"{name}.parquet")
    return folder


@pytest.fixture
def planted(tmp_path):
    rng = random.Random(3)
    test = [
        {"id": f"t{i}", "question": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)}
        for i in range(8)
    ]
    test[0]["question"] = f"{BOILERPLATE}: {test[0]['question']}"
    train = [
        {"id": f"r{i:02d}", "question": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng)}
        for i in range(40)
    ]
    # leaked: a held-out question inside a training question, a held-out answer as a training answer,
    # and 13 words of a rejected answer, punctuated and cased differently (normalised text)
    train[5]["question"] = "Some context. " + test[2]["question"] + " What now?"
    train[17]["rejected"] = test[4]["chosen"]
    words = test[6]["rejected"].split()[2:15]
    train[30]["chosen"] = "Note: " + ", ".join(w.upper() for w in words) + "!"
    for row in train[:12]:  # a template opening 12 training rows (and one held-out question): boilerplate
        row["question"] = f"{BOILERPLATE}: {row['question']}"
    return prepared(tmp_path / "prepared", train, test)


def run(tmp_path, params, prepared_dir):
    return decontaminate.run(
        params,
        prepared_dir,
        TASKS_DIR,
        tmp_path / "contamination",
        tmp_path / "metrics" / "contamination.json",
    )


def dropped(tmp_path) -> list[str]:
    return pq.read_table(tmp_path / "contamination" / "drop.parquet")["id"].to_pylist()


def test_planted_rows_are_found_and_boilerplate_is_not(tmp_path, tiny_params, planted):
    metrics = run(tmp_path, tiny_params, planted)
    report = read_json(tmp_path / "metrics" / "contamination.json")["report"]
    pref = report["tasks"]["dpo_heldout_pref"]
    assert pref["documents"] == 8 and pref["rows_overlapping"] == 3
    assert [e["id"] for e in pref["examples"]] == ["r05", "r17", "r30"]
    leaked = pq.read_table(planted / "test.parquet").to_pylist()[6]["rejected"].split()[2:15]
    assert pref["examples"][2] == {"id": "r30", "field": "chosen", "ngram": " ".join(leaked)}
    # chatml_format scores prompt + chosen only: the leak through a rejected answer is not in its documents
    assert metrics["chatml_format/rows_overlapping"] == 2
    assert metrics["rows_overlapping_any_task"] == 3 and metrics["common_ngrams_ignored"] > 0
    assert metrics["dropped_contaminated"] == 0 and dropped(tmp_path) == []  # report only by default

    loose = replace_params(tiny_params, decontamination={"common_rows": 20})  # the template now counts
    assert (
        run(tmp_path, loose, planted)["dpo_heldout_pref/rows_overlapping"] == 12 + 2
    )  # r00-r11 (r05 among them), r17, r30


def test_with_the_switch_the_overlapping_rows_are_selected_for_dropping(tmp_path, tiny_params, planted):
    strict = replace_params(tiny_params, decontamination={"drop": True})
    metrics = run(tmp_path, strict, planted)
    assert dropped(tmp_path) == ["r05", "r17", "r30"] and metrics["dropped_contaminated"] == 3


def test_an_unknown_task_and_a_missing_split_are_named(tmp_path, tiny_params, planted):
    from dpo_pipeline.config import EvalTask

    params = replace_params(tiny_params, eval={"tasks": [EvalTask("no_such_task", 0)]})
    with pytest.raises(StageError, match=r"eval\.tasks: unknown lm-eval task\(s\) no_such_task "):
        run(tmp_path, params, planted)
    with pytest.raises(StageError, match=r"train\.parquet: prepared split not found"):
        run(tmp_path, tiny_params, tmp_path / "nowhere")
    assert not (tmp_path / "contamination").exists() and not (tmp_path / "metrics").exists()


def test_an_ngram_longer_than_every_document_is_refused_and_a_short_task_warned():
    """Issue 24: decontamination.ngram 50 on short documents reported "no contamination", silently."""
    from dpo_pipeline.data.contamination import require_measurable
    from dpo_pipeline.errors import StageError

    documents = {
        "long_task": [["one two three four five six", "a b"]],
        "short_task": [["alpha beta", "gamma"]],
    }
    with pytest.raises(StageError, match=r"decontamination\.ngram: expected at most 6 words .*got 7"):
        require_measurable(documents, 7)
    (warning,) = require_measurable(documents, 3)
    assert "task short_task (longest 2 words)" in warning
    assert require_measurable(documents, 2) == []


def test_an_earlier_turn_of_a_multi_turn_prompt_is_checked_too():
    """A leaked document in the second-to-last user turn (not the question) is found, and named as history."""
    from dpo_pipeline.data.contamination import overlaps

    leaked = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    rows = [
        {"id": "a", "history": [leaked, "ok"], "question": "and now?", "chosen": "yes", "rejected": "no"},
        {"id": "b", "history": [], "question": "unrelated words only here", "chosen": "x", "rejected": "y"},
    ]
    report, ids = overlaps(rows, {"task": [[leaked]]}, 13, 10, 3)
    assert ids == {"a"}
    assert report["tasks"]["task"]["examples"][0]["field"] == "history"
