"""Pure parts of the evaluate stage and of the offline task helpers in tasks/heldout.py."""

from __future__ import annotations

import importlib.util
import math

import pytest

from dpo_pipeline.data import chatml
from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate import compare, harness, parts, samples
from dpo_pipeline.evaluate import tasks as tasks_lib
from dpo_pipeline.models import builtin
from tests.conftest import REPO

TASKS_DIR = REPO / "tasks"


def _heldout():
    spec = importlib.util.spec_from_file_location("heldout_under_test", REPO / "tasks" / "heldout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaderboard_results() -> dict:
    """The shape lm-eval 0.4.x returns for the Open LLM Leaderboard v1 suite (values made up)."""
    return {
        "results": {
            "arc_challenge": {
                "alias": "arc_challenge",
                "acc,none": 0.60,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.65,
                "acc_norm_stderr,none": 0.01,
            },
            "hellaswag": {
                "alias": "hellaswag",
                "acc,none": 0.64,
                "acc_stderr,none": 0.004,
                "acc_norm,none": 0.84,
                "acc_norm_stderr,none": 0.004,
            },
            "truthfulqa_mc2": {"alias": "truthfulqa_mc2", "acc,none": 0.55, "acc_stderr,none": 0.015},
            "mmlu": {"alias": "mmlu", "acc,none": 0.63, "acc_stderr,none": 0.0038},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.5, "acc_stderr,none": 0.04},
            "winogrande": {"alias": "winogrande", "acc,none": 0.78, "acc_stderr,none": 0.011},
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.61,
                "exact_match_stderr,strict-match": 0.013,
                "exact_match,flexible-extract": 0.62,
                "exact_match_stderr,flexible-extract": 0.013,
            },
        },
        "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.63, "acc_stderr,none": 0.0038}},
    }


SUITE = ["arc_challenge", "hellaswag", "truthfulqa_mc2", "mmlu", "winogrande", "gsm8k"]


def test_flat_scores_pick_the_leaderboard_metric_per_task_and_average_them():
    results = leaderboard_results()
    flat = harness.flat_scores(results, SUITE)
    assert "average" not in flat  # averages are made where every task's scores are (add_averages)
    scores = compare.add_averages(flat, harness.primary_keys(results, SUITE))
    expected_primary = {
        "arc_challenge/acc_norm": 0.65,
        "hellaswag/acc_norm": 0.84,
        "truthfulqa_mc2/acc": 0.55,
        "mmlu/acc": 0.63,
        "winogrande/acc": 0.78,
        "gsm8k/exact_match/strict-match": 0.61,
    }
    for key, value in expected_primary.items():
        assert scores[key] == value
    mean = sum(expected_primary.values()) / 6
    assert scores["average"] == pytest.approx(mean, abs=1e-6)
    assert scores["open_llm_v1/average"] == scores["average"]
    # the other metrics are kept too, stderrs included; subtasks of a group are not listed
    assert scores["arc_challenge/acc"] == 0.60
    assert scores["gsm8k/exact_match/flexible-extract"] == 0.62
    assert scores["gsm8k/exact_match_stderr/strict-match"] == 0.013
    assert not any(k.startswith("mmlu_anatomy") for k in scores)
    assert all(isinstance(v, float) for v in scores.values())


def test_primary_keys_name_the_flat_metric_per_task():
    keys = harness.primary_keys(leaderboard_results(), SUITE)
    assert keys == {
        "arc_challenge": "arc_challenge/acc_norm",
        "hellaswag": "hellaswag/acc_norm",
        "truthfulqa_mc2": "truthfulqa_mc2/acc",
        "mmlu": "mmlu/acc",
        "winogrande": "winogrande/acc",
        "gsm8k": "gsm8k/exact_match/strict-match",
    }


def test_average_covers_every_requested_task_and_the_suite_average_needs_all_six():
    results = leaderboard_results()
    results["results"]["dpo_heldout_pref"] = {"acc,none": 0.5, "acc_norm,none": 0.9, "acc_stderr,none": "N/A"}
    tasks = ["arc_challenge", "dpo_heldout_pref"]
    scores = compare.add_averages(harness.flat_scores(results, tasks), harness.primary_keys(results, tasks))
    assert scores["average"] == pytest.approx((0.65 + 0.9) / 2)
    assert "open_llm_v1/average" not in scores
    assert "dpo_heldout_pref/acc_stderr" not in scores  # "N/A" is not a number: left out


def test_averages_refuse_scores_without_a_primary_metric():
    with pytest.raises(StageError, match=r"metrics/eval_base\.json: no hellaswag/acc_norm to average"):
        compare.add_averages(
            {"arc_challenge/acc_norm": 0.6}, {"hellaswag": "hellaswag/acc_norm"}, "metrics/eval_base.json"
        )


def test_each_evaluate_stage_scores_its_own_tasks():
    """The base's benchmark stage reads no pipeline data; the held-out stage scores exactly the tasks/ tasks
    whose documents are data/prepared; the merged model is scored on all of them, in params order."""
    names = ["arc_challenge", "dpo_heldout_pref", "hellaswag", "chatml_format"]
    assert tasks_lib.heldout_task_names(TASKS_DIR) == {"dpo_heldout_pref", "chatml_format"}
    picked = {stage: parts.part_tasks(part, names, TASKS_DIR) for stage, part in parts.PARTS.items()}
    assert picked == {
        "evaluate_base": ["arc_challenge", "hellaswag"],
        "evaluate_base_heldout": ["dpo_heldout_pref", "chatml_format"],
        "evaluate": names,
    }


def test_group_results_are_found_in_the_groups_section():
    results = {"results": {}, "groups": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01}}}
    assert harness.flat_scores(results, ["mmlu"])["mmlu/acc"] == 0.4


def test_missing_task_or_metric_fails_with_a_clear_message():
    with pytest.raises(StageError, match="no results for task 'hellaswag'"):
        harness.flat_scores({"results": {}}, ["hellaswag"])
    with pytest.raises(StageError, match="gsm8k: expected metric 'exact_match,strict-match'"):
        harness.primary_metric("gsm8k", {"exact_match,flexible-extract": 0.5})


def test_unknown_tasks_fall_back_to_a_sensible_metric():
    assert harness.primary_metric("some_task", {"acc,none": 0.1, "acc_norm,none": 0.2}) == "acc_norm,none"
    assert harness.primary_metric("some_task", {"acc,none": 0.1, "f1,none": 0.2}) == "acc,none"
    assert (
        harness.primary_metric("some_task", {"f1,none": 0.2, "f1_stderr,none": 0.01, "bleu,none": math.nan})
        == "f1,none"
    )
    with pytest.raises(StageError, match="no numeric metric"):
        harness.primary_metric("some_task", {"alias": "x"})


def test_flat_key_names():
    assert harness.flat_key("arc_challenge", "acc_norm,none") == "arc_challenge/acc_norm"
    assert harness.flat_key("gsm8k", "exact_match,strict-match") == "gsm8k/exact_match/strict-match"


def test_compare_scores_adds_base_and_delta_but_no_delta_of_stderr():
    tuned = {"t/acc": 0.75, "t/acc_stderr": 0.1, "average": 0.75, "only_tuned": 1.0}
    base = {"t/acc": 0.5, "t/acc_stderr": 0.12, "average": 0.5, "only_base": 3.0}
    out = compare.compare_scores(tuned, base)
    assert out == {
        "t/acc": 0.75,
        "t/acc_base": 0.5,
        "t/acc_delta": 0.25,
        "t/acc_stderr": 0.1,
        "t/acc_stderr_base": 0.12,
        "average": 0.75,
        "average_base": 0.5,
        "average_delta": 0.25,
        "only_tuned": 1.0,
    }


def test_settings_meta_records_what_the_scores_depend_on(default_params):
    meta = harness.settings_meta(default_params, "0.4.13")
    assert meta == {
        "lm_eval_version": "0.4.13",
        "seed": default_params.seed,
        "batch_size": default_params.eval.batch_size,
        "limit": default_params.eval.limit,
        "dtype": default_params.eval.dtype,
        "num_fewshot": {"dpo_heldout_pref": 0, "chatml_format": 0},
    }
    assert set(compare.COMPARABLE_META) == set(meta)


def test_check_comparable_refuses_base_scores_made_with_other_settings():
    meta = {
        "lm_eval_version": "0.4.13",
        "seed": 42,
        "batch_size": 8,
        "limit": 0,
        "dtype": "float32",
        "num_fewshot": {"a": 0},
    }
    compare.check_comparable(meta, dict(meta), "metrics/eval_base.json")
    with pytest.raises(StageError, match=r"metrics/eval_base\.json: meta\.num_fewshot .*evaluate_base"):
        compare.check_comparable(meta, {**meta, "num_fewshot": {"a": 5}}, "metrics/eval_base.json")


def test_simple_evaluate_settings_come_from_params(default_params):
    e = default_params.eval
    kwargs = harness.simple_evaluate_kwargs(e, 7)
    assert kwargs["limit"] is None  # limit 0 = all documents
    assert "batch_size" not in kwargs and "device" not in kwargs  # the loaded model's wrapper has them
    assert {
        kwargs[k] for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
    } == {7}
    assert harness.simple_evaluate_kwargs(type(e)(**{**e.__dict__, "limit": 3}), 7)["limit"] == 3


def test_local_tasks_are_the_yamls_in_tasks_dir():
    assert tasks_lib.local_task_names(REPO / "tasks") == {"dpo_heldout_pref", "chatml_format"}


def test_every_recipe_task_has_the_leaderboard_metric(repo_root):
    from dpo_pipeline import config

    wanted = {
        "arc_challenge": "acc_norm,none",
        "hellaswag": "acc_norm,none",
        "truthfulqa_mc2": "acc,none",
        "mmlu": "acc,none",
        "winogrande": "acc,none",
        "gsm8k": "exact_match,strict-match",
    }
    recipe = config.load(repo_root / "recipes" / "neuralhermes-2.5.yaml")
    fewshot = {t.name: t.num_fewshot for t in recipe.eval.tasks}
    assert {k: fewshot[k] for k in wanted} == {
        "arc_challenge": 25,
        "hellaswag": 10,
        "truthfulqa_mc2": 0,
        "mmlu": 5,
        "winogrande": 5,
        "gsm8k": 5,
    }
    for name in fewshot:
        if name in wanted:
            assert harness.PRIMARY_METRICS[name] == wanted[name]
        else:
            assert name in tasks_lib.local_task_names(repo_root / "tasks")


@pytest.fixture(scope="module")
def chatml_tokenizer():

    texts = ["You are a helpful assistant.\nWhat is a Large Language Model?\nA model of language."] * 4
    return builtin.build_tokenizer(texts, 300)


def test_sample_prompts_use_the_prepare_stage_format(chatml_tokenizer):
    from dpo_pipeline.data.chatml import format_row

    for system in ("You are a helpful assistant chatbot.", ""):
        row = {
            "system": system,
            "question": "What is a Large Language Model?",
            "chosen": "a",
            "rejected": "b",
        }
        prompt = chatml.format_prompt(system, row["question"], chatml_tokenizer)
        assert prompt == format_row(row, chatml_tokenizer)["prompt"]
    assert (
        chatml.format_prompt("", "Hi?", chatml_tokenizer)
        == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generation_kwargs_and_answer_decoding(chatml_tokenizer, default_params):
    kwargs = samples.generation_kwargs(default_params.eval, chatml_tokenizer)
    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["max_new_tokens"]) == (0.7, 0.9, 48)
    assert kwargs["eos_token_id"] == chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")

    ids = chatml_tokenizer("A model", add_special_tokens=False)["input_ids"]
    eos = chatml_tokenizer.eos_token_id
    assert samples.decode_answer(ids + [eos] + ids, chatml_tokenizer) == ("A model", True)
    assert samples.decode_answer(ids, chatml_tokenizer) == ("A model", False)
    assert samples.decode_answer([eos], chatml_tokenizer) == ("", True)


# --------------------------------------------------------------------------------------------------------
# tasks/heldout.py


def test_answer_format_checks():
    heldout = _heldout()
    assert heldout.answer_format("Paris is the capital.") == {
        "format_ok": 1.0,
        "nonempty": 1.0,
        "no_markup": 1.0,
    }
    assert heldout.answer_format("  \n") == {"format_ok": 0.0, "nonempty": 0.0, "no_markup": 1.0}
    for leaked in ("Paris.<|im_end|>", "Paris.\nuser\nAnd Rome?", "<|im_start|>assistant"):
        result = heldout.answer_format(leaked)
        assert result["no_markup"] == 0.0 and result["format_ok"] == 0.0, leaked
    assert heldout.answer_format("The user asked.")["format_ok"] == 1.0  # the word alone is fine
    assert heldout.chatml_format_results({}, ["ok"])["format_ok"] == 1.0


def test_load_prepared_test_sorts_by_id_and_names_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    heldout = _heldout()
    table = pa.table(
        {"id": ["b", "a"], "prompt": ["P2", "P1"], "chosen": ["C2", "C1"], "rejected": ["R2", "R1"]}
    )
    pq.write_table(table.replace_schema_metadata({b"dpo.x": b"1"}), tmp_path / "test.parquet")
    data = heldout.load_prepared_test(prepared_dir=str(tmp_path), config_source="inline", version=1.0)
    assert list(data) == ["test"]
    assert data["test"]["id"] == ["a", "b"]
    assert heldout.preference_choices(data["test"][0]) == ["C1", "R1"]

    with pytest.raises(FileNotFoundError, match="test.parquet: held-out test split not found"):
        heldout.load_prepared_test(prepared_dir=str(tmp_path / "missing"))
    pq.write_table(table.drop(["rejected"]), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match="missing column.*rejected"):
        heldout.load_prepared_test(prepared_dir=str(tmp_path))
