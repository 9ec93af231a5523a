"""evaluate stage with lm-eval on tiny, hand-built models and a tiny held-out split.

The preference task is checked against two constructed models: every held-out pair differs in exactly one
token (a "good" word in chosen, a "bad" word of the same length in rejected), and the models' logits are
constant over positions, with that one token pushed up or down. One therefore prefers every chosen answer
(acc = acc_norm = 1.0), the other every rejected one (0.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_pipeline.data import chatml
from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate import harness, samples
from dpo_pipeline.evaluate import tasks as tasks_lib
from dpo_pipeline.io import read_json
from dpo_pipeline.models.loading import load_model, load_tokenizer
from stages import evaluate, report
from tests.conftest import REPO, replace_params

TASKS_DIR = REPO / "tasks"
N_ROWS = 6
LOGIT = 20.0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def find_word_pair(tokenizer, prompts: list[str]) -> tuple[str, str, int, int]:
    """Two single-token words of equal length whose swap changes exactly one token after each prompt."""
    vocab = tokenizer.get_vocab()
    words = sorted(
        (tokenizer.convert_tokens_to_string([tok]), idx)
        for tok, idx in vocab.items()
        if tok.startswith("Ġ") and tok[1:].isalpha() and len(tok) >= 4
    )
    for good, good_id in words:
        for bad, bad_id in words:
            if bad == good or len(bad) != len(good):
                continue
            ok = True
            for prompt in prompts:
                a = _encode(tokenizer, prompt + answer(good))
                b = _encode(tokenizer, prompt + answer(bad))
                diff = [(x, y) for x, y in zip(a, b, strict=False) if x != y]
                if len(a) != len(b) or diff != [(good_id, bad_id)]:
                    ok = False
                    break
            if ok:
                return good, bad, good_id, bad_id
    raise AssertionError("no suitable word pair in the tiny tokenizer's vocabulary")


def answer(word: str) -> str:
    return f"The answer is{word}.<|im_end|>\n"


def write_split(prepared: Path, raw_rows, tokenizer) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    picked = raw_rows[:N_ROWS]
    prompts = [chatml.format_prompt(r["system"], r["question"], tokenizer) for r in picked]
    assert any(not r["system"] for r in picked) and any(r["system"] for r in picked)
    good, bad, good_id, bad_id = find_word_pair(tokenizer, prompts)
    rows = [
        {
            "id": f"row-{(5 * i) % N_ROWS}",
            "system": r["system"],
            "question": r["question"],
            "prompt": prompt,
            "chosen": answer(good),
            "rejected": answer(bad),
        }
        for i, (r, prompt) in enumerate(zip(picked, prompts, strict=True))
    ]
    prepared.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), prepared / "test.parquet")
    return good_id, bad_id


def constant_logit_model(base_dir: Path, out: Path, up: int, down: int) -> Path:
    """A valid MistralForCausalLM whose logits are the same at every position: `up` high, `down` low.

    All embeddings are ones and every block's output projections are zero, so the residual stream stays
    ones; the final RMSNorm keeps it ones, and lm_head rows turn it into fixed logits.
    """
    import torch

    model = load_model(base_dir, dtype=torch.float32)
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[up].fill_(LOGIT / hidden)
        model.lm_head.weight[down].fill_(-LOGIT / hidden)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_base_dir, raw_rows):
    root = tmp_path_factory.mktemp("eval_inputs")
    tokenizer = load_tokenizer(tiny_base_dir)
    good_id, bad_id = write_split(root / "prepared", raw_rows, tokenizer)
    tuned = constant_logit_model(tiny_base_dir, root / "prefers_chosen", good_id, bad_id)
    # what the merge stage leaves next to a merged model: the lineage back to the adapter, by content
    (tuned / "pipeline_merge.json").write_text(
        json.dumps({"adapter_hash": "md5:" + "ab" * 16, "adapter_sha256": "cd" * 32})
    )
    return {
        "prepared": root / "prepared",
        "prefers_chosen": tuned,
        "prefers_rejected": constant_logit_model(tiny_base_dir, root / "prefers_rejected", bad_id, good_id),
    }


def _only(params, *names: str):
    from dpo_pipeline.config import EvalTask

    return replace_params(params, eval={"tasks": [EvalTask(name=n, num_fewshot=0) for n in names]})


def test_preference_task_scores_the_constructed_models_one_and_zero(tiny_params, eval_inputs):
    params = _only(tiny_params, "dpo_heldout_pref")
    for model, expected in (("prefers_chosen", 1.0), ("prefers_rejected", 0.0)):
        results = harness.run_lm_eval(eval_inputs[model], params, TASKS_DIR, eval_inputs["prepared"])
        scores = harness.flat_scores(results, ["dpo_heldout_pref"])
        assert scores["dpo_heldout_pref/acc"] == expected, model
        assert scores["dpo_heldout_pref/acc_norm"] == expected, model
        assert results["n-samples"]["dpo_heldout_pref"]["effective"] == N_ROWS


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_params, eval_inputs):
    """The base's two stages on the rejected-preferring model, then evaluate on the chosen-preferring one."""
    root = tmp_path_factory.mktemp("evaluated")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    metrics = root / "metrics"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        # The train run that made the adapter, tagged as the train stage tags it: evaluate and report find it
        # by the adapter's sha256 in pipeline_merge.json.
        import mlflow

        from dpo_pipeline import tracking

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(tiny_params.tracking.experiment)
        with mlflow.start_run(tags={"stage": "train", tracking.ADAPTER_SHA256_TAG: "cd" * 32}) as train_run:
            pass
        tuned_args = (eval_inputs["prefers_chosen"], eval_inputs["prepared"], TASKS_DIR, metrics)
        with pytest.raises(StageError, match=r"eval_base\.json: base model results not found"):
            evaluate.run(tiny_params, "evaluate", *tuned_args)
        # The benchmark stage reads no data: a missing prepared folder cannot stop it.
        base = evaluate.run(
            tiny_params,
            "evaluate_base",
            eval_inputs["prefers_rejected"],
            metrics / "absent",
            TASKS_DIR,
            metrics,
        )
        with pytest.raises(StageError, match=r"eval_base_heldout\.json: base model results not found"):
            evaluate.run(tiny_params, "evaluate", *tuned_args)
        heldout = evaluate.run(
            tiny_params,
            "evaluate_base_heldout",
            eval_inputs["prefers_rejected"],
            eval_inputs["prepared"],
            TASKS_DIR,
            metrics,
        )
        with pytest.raises(StageError, match=r"eval_merged\.json: scores not found"):
            report.run(tiny_params, metrics)
        tuned = evaluate.run(tiny_params, "evaluate", *tuned_args)
        reported = report.run(tiny_params, metrics)
    return {
        "metrics": metrics,
        "uri": uri,
        "base": base,
        "heldout": heldout,
        "tuned": tuned,
        "report": reported,
        "train_run_id": train_run.info.run_id,
    }


def test_evaluate_writes_every_key(evaluated, tiny_params):
    metrics = evaluated["metrics"]
    assert sorted(p.name for p in metrics.iterdir()) == [
        "eval.json",
        "eval_base.json",
        "eval_base_heldout.json",
        "eval_base_heldout_docs.json",
        "eval_card.md",
        "eval_merged.json",
        "eval_merged_docs.json",
        "headline_plot.json",
        "report_run.json",
        "samples.json",
        "samples_base.json",
    ]
    benchmarks = read_json(metrics / "eval_base.json")
    heldout = read_json(metrics / "eval_base_heldout.json")
    # The small profile's two tasks both read the held-out split: the benchmark stage scored none of them.
    assert benchmarks["meta"]["tasks"] == [] and heldout["meta"]["tasks"] == [
        "dpo_heldout_pref",
        "chatml_format",
    ]
    assert set(benchmarks) == {
        "samples/ended_turn",
        "samples/length_mean_tokens",
        "samples/length_median_tokens",
        "meta",
    }
    assert "average" not in heldout and "samples/ended_turn" not in heldout
    base = {**benchmarks, **heldout}
    base["average"] = (heldout["dpo_heldout_pref/acc_norm"] + heldout["chatml_format/format_ok"]) / 2
    tuned = read_json(metrics / "eval.json")
    per_task = [
        "dpo_heldout_pref/acc",
        "dpo_heldout_pref/acc_norm",
        "chatml_format/format_ok",
        "chatml_format/nonempty",
        "chatml_format/no_markup",
        "average",
        "samples/ended_turn",
    ]
    for key in per_task:
        assert isinstance(base[key], float), key
        assert tuned[key] == evaluated["report"][key]
        if key != "average":  # the averages are the report's
            assert tuned[key] == evaluated["tuned"][key]
        assert tuned[f"{key}_base"] == pytest.approx(base[key], abs=1e-6)
        assert tuned[f"{key}_delta"] == pytest.approx(tuned[key] - base[key], abs=1e-6)
    assert "dpo_heldout_pref/acc_stderr" in tuned and "dpo_heldout_pref/acc_stderr_delta" not in tuned
    # every top-level value but meta is a number, so dvc metrics diff shows them all
    assert all(isinstance(v, (int, float)) for k, v in tuned.items() if k != "meta")

    assert tuned["dpo_heldout_pref/acc"] == 1.0 and tuned["dpo_heldout_pref/acc_base"] == 0.0
    assert tuned["dpo_heldout_pref/acc_norm_delta"] == 1.0
    assert tuned["average"] == pytest.approx((1.0 + tuned["chatml_format/format_ok"]) / 2)

    meta = tuned["meta"]
    assert meta["model"] == "merged" and base["meta"]["model"] == "base"
    assert meta["lm_eval_version"] == "0.4.13"
    assert meta["seed"] == tiny_params.seed and meta["batch_size"] == tiny_params.eval.batch_size
    assert meta["limit"] == tiny_params.eval.limit
    assert meta["num_fewshot"] == {"dpo_heldout_pref": 0, "chatml_format": 0}
    assert meta["primary_metric"] == {
        "dpo_heldout_pref": "dpo_heldout_pref/acc_norm",
        "chatml_format": "chatml_format/format_ok",
    }
    assert meta["n_samples"] == {"dpo_heldout_pref": N_ROWS, "chatml_format": N_ROWS}
    assert len(meta["chat_template_sha"]) == 16
    assert meta["chat_template_sha_base"] == meta["chat_template_sha"]
    assert meta["adapter_hash"] == "md5:" + "ab" * 16 and "adapter_hash" not in base["meta"]


def test_samples_files_hold_one_answer_per_prompt(evaluated, tiny_params):
    for name, model in (("samples_base.json", "base"), ("samples.json", "merged")):
        data = read_json(evaluated["metrics"] / name)
        assert data["model"] == model
        assert data["generation"] == {
            "seed": tiny_params.seed,
            "temperature": tiny_params.eval.temperature,
            "top_p": tiny_params.eval.top_p,
            "max_new_tokens": tiny_params.eval.max_new_tokens,
        }
        prompts = tiny_params.eval.sample_prompts
        assert [(s["system"], s["question"]) for s in data["samples"]] == [
            (p.system, p.question) for p in prompts
        ]
        for sample in data["samples"]:
            assert isinstance(sample["answer"], str) and "<|im_" not in sample["answer"]
    # the chosen-preferring model repeats its favourite word and never ends its turn within 8 tokens
    tuned = read_json(evaluated["metrics"] / "samples.json")
    assert all(s["answer"].split() and not s["ended_turn"] for s in tuned["samples"])
    # samples.json puts the base model's answers next to the tuned ones, for diffs across commits
    assert tuned["base_samples"] == read_json(evaluated["metrics"] / "samples_base.json")["samples"]
    assert "base_samples" not in read_json(evaluated["metrics"] / "samples_base.json")


def test_evaluate_runs_are_tracked(evaluated):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(evaluated["uri"])
    runs = mlflow.search_runs(search_all_experiments=True)
    by_stage = {}
    for _, run in runs.iterrows():
        by_stage.setdefault(run["tags.stage"], []).append(run)
    assert {s: [r["status"] for r in rs] for s, rs in by_stage.items()} == {
        "evaluate_base": ["FINISHED"],
        "evaluate_base_heldout": ["FINISHED"],
        "evaluate": ["FINISHED"],  # the attempts without base scores failed before opening a run
        "report": ["FINISHED"],
        "train": ["FINISHED"],  # the fixture's stand-in for the run that made the adapter
    }
    reported = by_stage["report"][0]
    assert reported["metrics.dpo_heldout_pref/acc_norm_delta"] == 1.0
    assert reported["metrics.dpo_heldout_pref/acc_norm_significant"] == 1.0
    assert "dpo_heldout_pref/acc_norm" in reported["tags.eval.significant_deltas"].split(",")
    assert reported["tags.calibration.flagged"] == "none"
    assert reported["tags.input.merged_docs.hash"].startswith("sha256:")
    # the merged model as an MLflow logged model, carrying the report's metrics (issue 17's point 4)
    model = mlflow.MlflowClient(evaluated["uri"]).get_logged_model(reported["tags.model.id"])
    assert {m.key: m.value for m in model.metrics}["dpo_heldout_pref/acc_norm_delta"] == 1.0
    assert model.tags["lineage.evaluate_run_id"] == by_stage["evaluate"][0]["run_id"]
    assert model.tags["lineage.train_run_id"] == evaluated["train_run_id"]
    # No run id in a file a later stage reads (the scores files are report's deps): same bytes, no re-run.
    for name in ("eval_base.json", "eval_base_heldout.json", "eval_merged.json"):
        text = (evaluated["metrics"] / name).read_text()
        assert evaluated["train_run_id"] not in text and '"run_id"' not in text, name
    assert read_json(evaluated["metrics"] / "report_run.json")["mlflow_model_id"] == model.model_id
    assert "mlflow_model_id" not in read_json(evaluated["metrics"] / "eval.json")["meta"]
    run = by_stage["evaluate"][0]
    assert run["metrics.dpo_heldout_pref/acc_norm"] == 1.0
    assert run["tags.eval.model"] == "merged" and run["params.eval.batch_size"] == str(4)
    # outside dvc repro (no dvc.lock here) the inputs are hashed by us; under it they carry DVC's md5
    assert run["tags.input.merged.hash"].startswith("sha256:")
    assert (
        run["tags.lineage.adapter.hash"] == "md5:" + "ab" * 16
        and run["tags.lineage.train_run_id"] == evaluated["train_run_id"]
    )
    assert by_stage["evaluate_base"][0]["tags.input.base.hash"].startswith("sha256:")
    assert "tags.input.prepared.hash" not in by_stage["evaluate_base"][0] or pd.isna(
        by_stage["evaluate_base"][0]["tags.input.prepared.hash"]
    )
    assert by_stage["evaluate_base_heldout"][0]["tags.input.prepared.hash"].startswith("sha256:")
    assert "params.eval.max_new_tokens" not in by_stage["evaluate_base_heldout"][0] or pd.isna(
        by_stage["evaluate_base_heldout"][0]["params.eval.max_new_tokens"]
    )


def test_sample_generation_is_seeded(tiny_base_dir, tiny_params):
    first = samples.generate_samples(tiny_base_dir, tiny_params)
    again = samples.generate_samples(tiny_base_dir, tiny_params)
    assert first == again
    other = samples.generate_samples(tiny_base_dir, replace_params(tiny_params, seed=tiny_params.seed + 1))
    assert [s["answer"] for s in other] != [s["answer"] for s in first]


def test_groups_and_per_task_few_shot_go_through_the_registry_path(
    tmp_path, tiny_params, eval_inputs, monkeypatch
):
    """A group (like mmlu) is scored by its aggregate, and each task keeps its own few-shot count."""
    import shutil

    from dpo_pipeline.config import EvalTask

    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    (tasks / "pref_suite.yaml").write_text(
        "group: pref_suite\n"
        "task: [dpo_heldout_pref]\n"
        "aggregate_metric_list:\n"
        "  - {metric: acc_norm, weight_by_size: true}\n"
        "metadata: {version: 1.0}\n"
    )
    # A group counts as a registry name (lm-eval's own index would be scanned, ~15 s); it is the same code
    # path either way, so the test declares it local to skip that scan.
    assert "pref_suite" not in tasks_lib.local_task_names(tasks)
    local = tasks_lib.local_task_names
    monkeypatch.setattr(tasks_lib, "local_task_names", lambda d: local(d) | {"pref_suite"})
    params = replace_params(
        tiny_params,
        eval={"tasks": [EvalTask("pref_suite", 2), EvalTask("chatml_format", 0)], "limit": 3},
    )
    results = harness.run_lm_eval(eval_inputs["prefers_chosen"], params, tasks, eval_inputs["prepared"])
    assert results["n-shot"]["dpo_heldout_pref"] == 2
    assert results["n-shot"]["chatml_format"] == 0
    scores = harness.flat_scores(results, ["pref_suite", "chatml_format"])
    assert scores["pref_suite/acc_norm"] == 1.0
    assert harness.primary_keys(results, ["pref_suite"]) == {"pref_suite": "pref_suite/acc_norm"}


# ---------------------------------------------------------------------------------------------------------
# Issue 16: error bars, length, calibration (the report stage, on the constructed models)


def test_a_real_difference_is_significant_and_noise_is_not(evaluated, tmp_path, tiny_params, eval_inputs):
    """The chosen-preferring model against the rejected-preferring base: every held-out document flips, McNemar
    gives p = 2 / 2^6 < 0.05. The same model against itself: zero discordant documents, p = 1."""
    tuned = read_json(evaluated["metrics"] / "eval.json")
    assert tuned["dpo_heldout_pref/acc_p_value"] == pytest.approx(2 / 2**N_ROWS, abs=1e-6)
    assert tuned["dpo_heldout_pref/acc_significant"] == 1.0
    assert tuned["dpo_heldout_pref/acc_delta_stderr"] == 0.0  # every document moved by exactly +1
    assert "paired over 6 documents" in tuned["meta"]["uncertainty"]["dpo_heldout_pref"]

    import shutil

    same = tmp_path / "metrics"
    same.mkdir()
    for name in ("eval_base.json", "eval_base_heldout.json", "eval_base_heldout_docs.json"):
        shutil.copy(evaluated["metrics"] / name, same / name)
    # the base's own scores, as the "merged" model's: a tuned model no different from its base
    heldout = read_json(same / "eval_base_heldout.json")
    (same / "eval_merged.json").write_text(json.dumps({**read_json(same / "eval_base.json"), **heldout}))
    shutil.copy(same / "eval_base_heldout_docs.json", same / "eval_merged_docs.json")
    noise = report.run(tiny_params, same)
    assert noise["dpo_heldout_pref/acc_delta"] == 0.0 and noise["dpo_heldout_pref/acc_p_value"] == 1.0
    assert noise["dpo_heldout_pref/acc_significant"] == 0.0 and noise["average_significant"] == 0.0


def test_length_figures_of_base_and_tuned(evaluated):
    tuned = read_json(evaluated["metrics"] / "eval.json")
    for key in (
        "samples/length_mean_tokens",
        "chatml_format/length_mean_tokens",
        "chatml_format/length_median_tokens",
    ):
        assert tuned[key] >= 0 and f"{key}_base" in tuned and f"{key}_delta" in tuned
    # the constructed rows' answers have the same length: no pair falls in a bucket, so no bucket figures
    assert tuned["meta"]["length_buckets"] == {"dpo_heldout_pref": {"same_length": N_ROWS}}
    assert "dpo_heldout_pref/acc_norm_length_controlled" not in tuned
    docs = read_json(evaluated["metrics"] / "eval_merged_docs.json")["tasks"]
    assert docs["dpo_heldout_pref"]["metrics"]["acc"] == [1.0] * N_ROWS
    assert docs["dpo_heldout_pref"]["ids"] == sorted(docs["dpo_heldout_pref"]["ids"])
    assert len(docs["chatml_format"]["lengths"]) == N_ROWS
    card = (evaluated["metrics"] / "eval_card.md").read_text()
    assert "| dpo_heldout_pref | acc_norm | 0 | 1.0000 | 0.0000 | 1.0000 |" in card


@pytest.mark.parametrize(
    ("value", "flagged"),
    [(0.0, False), (0.015, False), (0.5, True)],  # the base scored 0.0 (it prefers every rejected answer)
)
def test_calibration_flags_a_base_that_does_not_reproduce_its_published_figure(
    evaluated, tmp_path, tiny_params, value, flagged
):
    import shutil

    from dpo_pipeline.config import PublishedScore

    metrics = tmp_path / "metrics"
    shutil.copytree(evaluated["metrics"], metrics)
    figure = PublishedScore("dpo_heldout_pref", "acc_norm", value, 0, "a test's statement", True)
    params = replace_params(tiny_params, report={"published": [figure], "calibration_tolerance": 0.02})
    out = report.run(params, metrics)
    assert out["dpo_heldout_pref/acc_norm_published"] == value
    assert out["dpo_heldout_pref/acc_norm_vs_published"] == pytest.approx(-value)
    assert out["dpo_heldout_pref/acc_norm_calibrated"] == (0.0 if flagged else 1.0)
    assert out["calibration/flagged"] == (1.0 if flagged else 0.0) and out["calibration/stated"] == 1.0
    (record,) = out["meta"]["calibration"]
    assert record["flagged"] is flagged and record["source"] == "a test's statement"
    card = (metrics / "eval_card.md").read_text()
    assert ("**not comparable**" in card) is flagged
    if not flagged:
        return
    # a few-shot count that differs from the figure's is flagged too, whatever the value
    other = replace_params(
        params, report={"published": [PublishedScore("dpo_heldout_pref", "acc_norm", 0.0, 5, "x", False)]}
    )
    assert report.run(other, metrics)["meta"]["calibration"][0]["why"].startswith(
        "scored 0-shot, the figure is 5-shot"
    )
    # with the switch on, a mismatch fails the stage and leaves the previous files as they were
    before = {p.name: p.read_bytes() for p in metrics.iterdir()}
    strict = replace_params(params, report={"on_calibration_mismatch": "fail"})
    with pytest.raises(
        StageError,
        match=r"report\.on_calibration_mismatch is fail: dpo_heldout_pref/acc_norm: your harness does not reproduce the published setup",
    ):
        report.run(strict, metrics)
    assert {p.name: p.read_bytes() for p in metrics.iterdir()} == before
