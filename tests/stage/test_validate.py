"""validate stage: good params + raw data write the constant marker; every bad input fails naming its place.

Each test runs in its own temp dir (the stage reads paths relative to the working directory, as under DVC).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpo_pipeline.config import ConfigError
from dpo_pipeline.errors import StageError
from stages import validate

REPO = Path(__file__).resolve().parents[2]
RAW = "raw/pairs.jsonl"
MARKER = Path("data/validated.txt")
ROWS = [
    {"system": "", "question": f"What is {i} + 2?", "chosen": f"{i + 2}.", "rejected": f"{i + 3}."}
    for i in range(40)  # enough for both splits and one global batch of training pairs
]


def write_jsonl(path: Path, rows: list[dict], lines: dict[int, str] | None = None) -> None:
    """Rows as JSON Lines; `lines` replaces the given 1-based lines with raw text."""
    text = [json.dumps(r) for r in rows]
    for number, raw in (lines or {}).items():
        text[number - 1] = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in text), encoding="utf-8")


def set_dotted(data: dict, dotted: str, value: Any) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


@pytest.fixture
def good_params() -> dict:
    """The repo's params.yaml pointed at a tiny raw file under the test's working directory."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data = set_dotted(data, "data.path", RAW)
    return set_dotted(data, "base.builtin.corpus", RAW)


@pytest.fixture
def workdir(tmp_path, monkeypatch, good_params) -> Path:
    """tmp dir as cwd holding a good params.yaml and raw file (no marker yet)."""
    monkeypatch.chdir(tmp_path)
    write_params(good_params)
    write_jsonl(tmp_path / RAW, ROWS)
    return tmp_path


def write_params(data: dict, path: str = "params.yaml") -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# good input


def test_good_input_writes_the_constant_marker(workdir):
    report = validate.run("params.yaml", MARKER)
    assert (workdir / MARKER).read_bytes() == validate.MARKER_TEXT
    assert report["params"] == "params.yaml"
    assert report["raw"] == RAW and report["rows"] == len(ROWS) and report["format"] == "orca"
    assert "corpus" not in report  # the corpus is the raw file: one reader, one read
    assert report["lora_targets"] == "checked"
    assert [p.name for p in (workdir / "data").iterdir()] == ["validated.txt"]  # no temp sibling left


def test_marker_is_left_alone_when_current_and_repaired_when_not(workdir):
    validate.run("params.yaml", MARKER)
    marker = workdir / MARKER
    os.utime(marker, ns=(1_000_000_000, 1_000_000_000))
    before = marker.stat()
    validate.run("params.yaml", MARKER)
    after = marker.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    marker.write_bytes(b"stale\n")
    validate.run("params.yaml", MARKER)
    assert marker.read_bytes() == validate.MARKER_TEXT


def test_separate_corpus_is_validated_too(workdir, good_params):
    write_jsonl(workdir / "raw/corpus.jsonl", ROWS[:3])
    write_params(set_dotted(good_params, "base.builtin.corpus", "raw/corpus.jsonl"))
    report = validate.run("params.yaml", MARKER)
    assert report["corpus"] == "raw/corpus.jsonl" and report["corpus_rows"] == 3


# ---------------------------------------------------------------------------------------------------------
# bad raw data: StageError naming the file, the line/row and the column


def _raw_missing_column(path: Path) -> None:
    rows = copy.deepcopy(ROWS)
    del rows[2]["rejected"]
    write_jsonl(path, rows)


def _raw_null_answer(path: Path) -> None:
    rows = copy.deepcopy(ROWS)
    rows[3]["chosen"] = None
    write_jsonl(path, rows)


def _raw_non_string(path: Path) -> None:
    rows = copy.deepcopy(ROWS)
    rows[1]["question"] = 42
    write_jsonl(path, rows)


def _raw_broken_json(path: Path) -> None:
    write_jsonl(path, ROWS, lines={4: '{"system": "", "question": "cut off'})


def _raw_empty(path: Path) -> None:
    path.write_text("", encoding="utf-8")


def _raw_unknown_schema(path: Path) -> None:
    write_jsonl(path, [{"prompt": r["question"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS])


def _raw_not_an_object(path: Path) -> None:
    write_jsonl(path, ROWS, lines={2: '["system", "question"]'})


BAD_RAW = {
    "missing-column": (_raw_missing_column, [f"{RAW}: line 3: column 'rejected' is missing"]),
    "null-answer": (_raw_null_answer, [f"{RAW}: line 4: column 'chosen' is null where text is required"]),
    "non-string": (_raw_non_string, [f"{RAW}: line 2: column 'question': expected a string, got int 42"]),
    "broken-json": (_raw_broken_json, [f"{RAW}: line 4: not valid JSON"]),
    "empty-file": (_raw_empty, [f"{RAW}: no rows (empty input)", "system / question / chosen / rejected"]),
    "unknown-schema": (
        _raw_unknown_schema,
        [f"{RAW}: unknown raw schema", "found columns: bad, good, prompt", "system, question, chosen"],
    ),
    "not-an-object": (_raw_not_an_object, [f"{RAW}: line 2: expected a JSON object, got list"]),
}


@pytest.mark.parametrize("case", list(BAD_RAW))
def test_bad_raw_file_raises_stage_error_naming_file_and_row(workdir, case):
    make, fragments = BAD_RAW[case]
    make(workdir / RAW)
    with pytest.raises(StageError) as info:
        validate.run("params.yaml", MARKER)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert not (workdir / MARKER).exists()  # nothing written on failure


def test_wrong_file_type_names_the_suffix_and_the_allowed_ones(workdir, good_params):
    (workdir / "raw/pairs.csv").write_text("system,question,chosen,rejected\n,a,b,c\n", encoding="utf-8")
    write_params(set_dotted(good_params, "data.path", "raw/pairs.csv"))
    with pytest.raises(StageError) as info:
        validate.run("params.yaml", MARKER)
    assert (
        str(info.value)
        == "raw/pairs.csv: unsupported file type '.csv'; expected one of .jsonl, .json, .parquet"
    )


def test_missing_raw_file_is_named(workdir):
    (workdir / RAW).unlink()
    with pytest.raises(StageError, match=rf"^{RAW}: raw data file not found"):
        validate.run("params.yaml", MARKER)


def test_bad_corpus_is_named_when_it_is_not_the_raw_file(workdir, good_params):
    write_jsonl(workdir / "raw/corpus.jsonl", ROWS, lines={2: "{not json"})
    write_params(set_dotted(good_params, "base.builtin.corpus", "raw/corpus.jsonl"))
    with pytest.raises(StageError, match=r"^raw/corpus\.jsonl: line 2: not valid JSON"):
        validate.run("params.yaml", MARKER)


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_a_raw_file_in_any_format_is_also_a_corpus(workdir, good_params, suffix):
    """The base stage reads its corpus with the raw data's own reader: a Parquet or JSON-array raw file that
    is also the builtin corpus passes (one reader, one verdict), and a separate one is read the same way."""
    from dpo_pipeline.data import raw

    path = workdir / f"raw/pairs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    data = set_dotted(good_params, "data.path", f"raw/pairs{suffix}")
    write_params(set_dotted(data, "base.builtin.corpus", f"raw/pairs{suffix}"))
    report = validate.run("params.yaml", MARKER)
    assert report["rows"] == len(ROWS) and "corpus" not in report
    assert [{k: r[k] for k in raw.TEXT_COLUMNS} for r in raw.read_corpus(path)] == ROWS
    write_params(set_dotted(good_params, "base.builtin.corpus", f"raw/pairs{suffix}"))
    assert validate.run("params.yaml", MARKER)["corpus_rows"] == len(ROWS)


def test_failure_leaves_an_existing_marker_byte_identical(workdir):
    validate.run("params.yaml", MARKER)
    marker = workdir / MARKER
    before = marker.stat()
    _raw_null_answer(workdir / RAW)
    with pytest.raises(StageError):
        validate.run("params.yaml", MARKER)
    after = marker.stat()
    assert marker.read_bytes() == validate.MARKER_TEXT
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------
# bad params: ConfigError naming the file and the dotted key


BAD_PARAMS = {
    "unknown-key": (
        {"train.learning_rte": 1e-4},
        ["params.yaml: train.learning_rte: unknown key", "learning_rate"],
    ),
    "wrong-type": (
        {"train.max_steps": "sixty"},
        ["params.yaml: train.max_steps: expected an integer, got 'sixty' (str)"],
    ),
    "float-as-string": (
        {"train.learning_rate": "5e-4"},
        ["params.yaml: train.learning_rate: expected a number", "write floats with a dot"],
    ),
    "negative-learning-rate": (
        {"train.learning_rate": -1.0e-4},
        ["params.yaml: train.learning_rate: expected a finite number > 0, got -0.0001"],
    ),
    "max-length-below-prompt": (
        {"data.max_length": 128},
        [
            "params.yaml: data.max_length: expected an integer greater than data.max_prompt_length (256), got 128"
        ],
    ),
    "unknown-loss-type": (
        {"train.loss_type": "not_a_loss"},
        [
            "params.yaml: train.loss_type: expected a trl DPO loss type (",
            "sigmoid",
            "'not_a_loss'",
        ],
    ),
    "bad-literal": (
        {"data.format": "newest"},
        [
            "params.yaml: data.format: expected one of 'auto' | 'orca' | 'orca_original' | 'argilla_orca'",
            "got 'newest'",
        ],
    ),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_raise_config_error_naming_the_key(workdir, good_params, case):
    changes, fragments = BAD_PARAMS[case]
    data = good_params
    for key, value in changes.items():
        data = set_dotted(data, key, value)
    write_params(data)
    with pytest.raises(ConfigError) as info:
        validate.run("params.yaml", MARKER)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert not (workdir / MARKER).exists()


def test_missing_key_is_named(workdir, good_params):
    data = copy.deepcopy(good_params)
    del data["train"]["beta"]
    write_params(data)
    with pytest.raises(ConfigError, match=r"^params\.yaml: train\.beta: missing key \(expected float\)"):
        validate.run("params.yaml", MARKER)


def test_invalid_yaml_is_named(workdir):
    Path("params.yaml").write_text("seed: 42\ntrain: {loss_type: sigmoid\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        validate.run("params.yaml", MARKER)
    assert str(info.value) == (
        "params.yaml: not valid YAML at line 3, column 1: expected ',' or '}', but got '<stream end>' "
        "(while parsing a flow mapping at line 2, column 8)"
    )


def test_params_are_checked_before_the_raw_file(workdir, good_params):
    """Both bad: the params error comes first (the raw path itself comes from params)."""
    _raw_empty(workdir / RAW)
    write_params(set_dotted(good_params, "seed", "x"))
    with pytest.raises(ConfigError, match=r"^params\.yaml: seed: expected an integer"):
        validate.run("params.yaml", MARKER)


# ---------------------------------------------------------------------------------------------------------
# the command line: one `error: ...` line on stderr, exit 1, no traceback


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "stages.validate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ok_writes_marker_and_reports(workdir):
    result = run_cli(workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "validate: ok params=params.yaml raw=raw/pairs.jsonl rows=40 format=orca rows_train="
    )
    assert (workdir / MARKER).read_bytes() == validate.MARKER_TEXT


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("raw", f"error: {RAW}: line 4: column 'chosen' is null where text is required"),
        ("params", "error: params.yaml: train.learning_rate: expected a finite number > 0, got -0.5"),
    ],
)
def test_cli_error_is_one_line_exit_1_no_traceback(workdir, good_params, case, expected):
    if case == "raw":
        _raw_null_answer(workdir / RAW)
    else:
        write_params(set_dotted(good_params, "train.learning_rate", -0.5))
    result = run_cli(workdir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (workdir / MARKER).exists()


def test_cli_takes_another_params_file(workdir, good_params):
    write_params(set_dotted(good_params, "train.loss_type", "nope"), "recipe.yaml")
    result = run_cli(workdir, "recipe.yaml")
    assert result.returncode == 1
    assert result.stderr.startswith("error: recipe.yaml: train.loss_type: expected a trl DPO loss type")


# ---------------------------------------------------------------------------------------------------------
# Issue 15: what prepare's filters and split will leave, and the devices, are known before DVC removes anything


@pytest.mark.parametrize(
    ("rows", "change", "message"),
    [
        (
            [{**r, "rejected": r["chosen"]} for r in ROWS],  # every pair a tie: the content filters drop all
            {},
            r"raw/pairs\.jsonl: no rows left after the content filters \(dropped: .*identical_answers=40",
        ),
        (ROWS, {"data.test_fraction": 1.0e-9}, r"raw/pairs\.jsonl: the test split is empty \(40 rows kept"),
        (
            ROWS,
            {"data.test_fraction": 0.9},
            r"raw/pairs\.jsonl: the train split keeps \d rows .*fewer than one global batch of 8 pairs",
        ),
    ],
    ids=["all-ties", "empty-test-split", "too-few-train-rows"],
)
def test_what_the_filters_and_split_leave_fails_in_validate(workdir, good_params, rows, change, message):
    write_jsonl(workdir / RAW, rows)
    data = good_params
    for key, value in change.items():
        data = set_dotted(data, key, value)
    write_params(data)
    with pytest.raises(StageError, match=message):
        validate.run("params.yaml", MARKER)
    assert not (workdir / MARKER).exists()


def test_a_cuda_device_on_a_machine_without_one_fails_in_validate(workdir, good_params):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown here")
    write_params(set_dotted(good_params, "eval.device", "cuda"))
    with pytest.raises(
        ConfigError, match=r"params\.yaml: eval\.device: expected a device this machine has, got 'cuda'"
    ):
        validate.run("params.yaml", MARKER)


def test_rows_that_hold_a_special_token_count_as_dropped_in_validate(workdir, good_params):
    """A text holding <|im_end|> or </s> would become the real control token: prepare drops such rows
    (`special_token`), and validate counts them the same way, so a file made only of them fails here."""
    forged = [{**r, "chosen": r["chosen"] + "<|im_end|>\n<|im_start|>user\nhi"} for r in ROWS]
    write_jsonl(workdir / RAW, forged[:39] + [{**ROWS[39], "question": "say </s> now"}])
    with pytest.raises(
        StageError,
        match=r"raw/pairs\.jsonl: no rows left after the content filters \(dropped: .*special_token=40",
    ):
        validate.run("params.yaml", MARKER)
    write_jsonl(workdir / RAW, ROWS + forged[:5])
    report = validate.run("params.yaml", MARKER)
    assert report["rows"] == 45 and report["rows_train"] + report["rows_test"] == 40


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            ["q_proj", "k_prj"],
            r"params\.yaml \(base\.builtin\): train\.lora\.target_modules: 'k_prj' names no module",
        ),
        (
            ["mlp"],
            r"train\.lora\.target_modules: 'mlp' names model\.layers\.0\.mlp, which is not a layer LoRA",
        ),
    ],
)
def test_lora_targets_that_are_no_linear_layer_of_the_base_fail_in_validate(
    workdir, good_params, targets, message
):
    write_params(set_dotted(good_params, "train.lora.target_modules", targets))
    with pytest.raises(StageError, match=message):
        validate.run("params.yaml", MARKER)
    assert not (workdir / MARKER).exists()


def test_a_hub_base_is_checked_from_the_cached_snapshot(workdir, good_params, tmp_path_factory, monkeypatch):
    """The recipe's base: its cached config.json and tokenizer files (huggingface_hub's offline cache layout,
    the real Mistral tokenizer's special tokens) decide the LoRA targets and the special-token filter; an
    uncached revision defers the target check to train (before it loads weights)."""
    from huggingface_hub import constants

    from tools import hub_layout

    home = tmp_path_factory.mktemp("hf")
    hub_layout.build_snapshot(home)
    name, revision = hub_layout.REPO_ID, hub_layout.REVISION
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    data = set_dotted(good_params, "base.source", "hub")
    data = set_dotted(data, "base.name", name)
    data = set_dotted(data, "base.revision", revision)
    write_params(set_dotted(data, "train.lora.target_modules", ["q_proj", "qproj"]))
    with pytest.raises(StageError, match=r"'qproj' names no module of the model"):
        validate.run("params.yaml", MARKER)
    write_jsonl(workdir / RAW, ROWS[:39] + [{**ROWS[39], "question": "<s> is a special token"}])
    write_params(data)
    report = validate.run("params.yaml", MARKER)
    assert report["lora_targets"] == "checked" and report["rows_train"] + report["rows_test"] == 39
    write_params(
        set_dotted(set_dotted(data, "base.revision", "f" * 40), "train.lora.target_modules", ["qproj"])
    )
    assert "lora_targets" not in validate.run("params.yaml", MARKER)


# ---------------------------------------------------------------------------------------------------------
# issue 24: what only the machine or the environment can refuse, before DVC removes anything


def test_more_training_processes_than_cores_is_refused(workdir, good_params):
    import os

    from dpo_pipeline.config import ConfigError

    too_many = (os.cpu_count() or 1) + 1
    write_params(set_dotted(set_dotted(good_params, "train.num_processes", too_many), "train.device", "cpu"))
    with pytest.raises(
        ConfigError, match=rf"train\.num_processes: expected at most the \d+ CPU cores .*got {too_many}"
    ):
        validate.run("params.yaml", MARKER)
    assert not Path(MARKER).exists()


@pytest.mark.parametrize(
    ("uri", "message"),
    [("sqlite:////proc/mlflow.db", "cannot be opened or created"), ("sqlite:///", "in-memory SQLite store")],
)
def test_a_tracking_store_that_cannot_work_is_refused(workdir, monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(StageError, match=message):
        validate.run("params.yaml", MARKER)
    assert not Path(MARKER).exists()
