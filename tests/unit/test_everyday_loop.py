"""Issue 27, the parts that need no pipeline run: experiment tags from DVC's environment, the registration
policy, `make help` covering every target, and `make mlflow-server` serving the store `dvc repro` writes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from dpo_pipeline import lineage, tracking

REPO = Path(__file__).resolve().parents[2]


def test_experiment_tags_come_from_the_variables_dvc_sets():
    # dvc/repo/experiments/queue/base.py sets both for every `dvc exp run` (workspace, --temp, --queue)
    from dvc.env import DVC_EXP_BASELINE_REV, DVC_EXP_NAME

    assert (lineage.EXP_NAME_ENV, lineage.EXP_BASELINE_ENV) == (DVC_EXP_NAME, DVC_EXP_BASELINE_REV)
    env = {DVC_EXP_NAME: "beta02", DVC_EXP_BASELINE_REV: "a" * 40}
    assert lineage.experiment_tags(env) == {"dvc.exp.name": "beta02", "dvc.exp.baseline": "a" * 40}
    assert lineage.experiment_tags({}) == {}


def test_params_fingerprint_is_stable_and_sensitive():
    a = {"train": {"beta": 0.1, "lr": 5e-4}}
    assert lineage.params_fingerprint(a) == lineage.params_fingerprint({"train": {"lr": 5e-4, "beta": 0.1}})
    assert lineage.params_fingerprint(a) != lineage.params_fingerprint({"train": {"beta": 0.2, "lr": 5e-4}})


def test_a_model_version_is_registered_only_as_the_policy_allows():
    clean, dirty = {"git.dirty": "false"}, {"git.dirty": "true"}
    exp = {"dvc.exp.name": "beta02", "dvc.exp.baseline": "b" * 40}
    assert tracking.registration("clean", clean, {}) == (True, "clean commit")
    assert tracking.registration("clean", dirty, {}) == (False, "uncommitted work tree")
    registered, source = tracking.registration("clean", dirty, exp)
    assert not registered and source == "experiment beta02 (baseline bbbbbbbb)"
    assert tracking.registration("always", dirty, exp)[0] and not tracking.registration("never", clean, {})[0]


def test_make_help_lists_every_target_with_its_comment():
    makefile = (REPO / "Makefile").read_text()
    targets = re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.MULTILINE)
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    listed = dict(re.findall(r"^  (\S+)\s+(.+)$", out, re.MULTILINE))
    assert sorted(listed) == sorted(targets)
    assert all(len(text) > 15 for text in listed.values()), listed
    phony = set(re.search(r"^\.PHONY: (.+?)\n(?!\t)", makefile, re.MULTILINE | re.DOTALL).group(1).split())
    assert phony - {"\\"} == set(targets)


def test_the_mlflow_server_serves_the_store_dvc_repro_writes(tmp_path, monkeypatch):
    """The server's backend store is tracking's default store (./mlflow.db) and its artifact destination is where
    that store's runs keep their artifacts (./mlruns), so the first `make mlflow-server` after `make repro`
    shows its runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = subprocess.run(
        ["make", "-n", "-s", "mlflow-server", "-o", "setup"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    backend = re.search(r"--backend-store-uri (\S+)", out).group(1)
    artifacts = re.search(r"--artifacts-destination (\S+)", out).group(1)
    monkeypatch.chdir(REPO)
    assert backend == tracking.default_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    assert artifacts == str(REPO / "mlruns")


def test_the_chat_tool_says_when_it_talks_to_the_builtin_demo(tmp_path):
    import json

    from tools import chat

    (tmp_path / "pipeline_base.json").write_text(
        json.dumps({"source": "builtin", "parameter_count": 1311872})
    )
    assert chat.demo_note(tmp_path).startswith("note: this is the builtin demo model (1.3M parameters")
    (tmp_path / "pipeline_base.json").write_text(json.dumps({"source": "hub", "name": "teknium/OpenHermes"}))
    assert chat.demo_note(tmp_path) == ""


def test_training_progress_is_one_line_per_log_with_step_total_and_eta():
    import io
    from types import SimpleNamespace

    from dpo_pipeline.train import dpo

    line = dpo.progress_line(
        20, 60, {"loss": 0.6512, "rewards/margins": 0.1234, "rewards/accuracies": 0.75}, 10.0, 20
    )
    assert line == "train: step 20/60 loss 0.6512 margin +0.123 acc 0.75 | 10s elapsed, eta 20s"
    kto = dpo.progress_line(5, 10, {"loss": 0.5}, 4.0, 0)  # resumed at step 5, nothing run yet: no ETA
    assert kto == "train: step 5/10 loss 0.5000 | 4s elapsed"

    out = io.StringIO()  # not a terminal: plain lines, as `dvc repro` captures stderr
    callback = dpo.progress_callback(4, stream=out)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    for step in (2, 4):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 0.5, "rewards/margins": 0.1})
    callback.on_log(None, state, None, logs={"eval_loss": 0.4})  # evaluation logs are not progress
    callback.on_train_end(None, state, None)
    lines = out.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["train: step 2/4", "train: step 4/4"]
    assert "eta" in lines[0] and "\r" not in out.getvalue()


def test_library_deprecations_we_cannot_fix_are_filtered_and_no_other_warning_is():
    import warnings

    from dpo_pipeline import runner

    runner.setup_output()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for category, message in runner.DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_scores_are_not_meaningful_below_the_held_out_size_or_above_the_epochs():
    from dpo_pipeline.evaluate.report import card_section, meaningfulness

    assert meaningfulness(335, 1.0, 100, 3.0) == []
    problems = meaningfulness(3, 14.2, 100, 3.0)
    assert problems[0].startswith("only 3 held-out pairs (report.min_heldout_pairs 100)")
    assert problems[1].startswith("14.2 epochs over the training pairs (report.max_epochs 3)")
    assert meaningfulness(None, None, 100, 3.0) == []  # no held-out task, no pairs file: nothing to judge
    card = card_section({"meta": {"not_meaningful": problems, "primary_metric": {}}}, 0.05)
    assert "**Not meaningful:** only 3 held-out pairs" in card


def test_dvc_uses_the_offline_plots_page():
    """.dvc/config points DVC at plots/offline.html: DVC's page with the three libraries inlined and no {scripts}
    placeholder, so DVC adds no CDN tags (dvc_render.html fills only the placeholders a template has)."""
    import configparser

    from dvc_render.vega import VegaRenderer

    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    template = (REPO / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template == REPO / "plots" / "offline.html"
    page = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page
    for url in re.findall(r'src="(https://cdn[^"]+)"', VegaRenderer.SCRIPTS):
        name, version = url.rsplit("/", 1)[1].rsplit("@", 1)
        assert f"<script>/* {name}@{version} */" in page, (name, version)  # the versions DVC's page asks for
    assert not re.search(r"<script[^>]*\bsrc=", page)


def test_every_tool_answers_help_and_does_nothing_else():
    """`python -m tools.X --help` prints a usage line and exits 0 for every tool with a command line, and leaves
    the work tree as it was (a tool that took --help as a folder name once installed packages into it)."""
    import sys

    tools = sorted(
        p.stem
        for p in (REPO / "tools").glob("*.py")
        if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")
    )
    assert {"chat", "publish", "headline", "compare", "doctor", "gpu_bundle", "verify"} <= set(tools)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    for tool in tools:
        out = subprocess.run(
            [sys.executable, "-m", f"tools.{tool}", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "usage:" in out.stdout, (tool, out.stdout[-300:], out.stderr[-300:])
    after = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert after == before


def test_the_last_periodic_evaluation_stands_for_the_final_one():
    from dpo_pipeline.train import dpo

    history = [{"loss": 0.6, "step": 20}, {"eval_loss": 0.5, "step": 20}, {"eval_loss": 0.4, "step": 60}]
    assert dpo.final_evaluation(history, 60) == {"eval_loss": 0.4, "step": 60}
    assert (
        dpo.final_evaluation(history[:2], 60) is None
    )  # eval_steps does not divide max_steps: evaluate again
    rows = dpo.history_rows([*history, {"eval_loss": 0.4, "step": 60}], dpo.EVAL_HISTORY_COLUMNS)
    assert [r["step"] for r in rows] == [20, 60]  # one row per step


def test_row_progress_prints_tenths_off_a_terminal_and_nothing_on_one(monkeypatch):
    import io

    from dpo_pipeline.runner import RowProgress

    monkeypatch.setenv("TQDM_DISABLE", "1")  # what setup_output sets when stderr is not a terminal
    out = io.StringIO()
    progress = RowProgress("reference: train pairs", 20, stream=out)
    for _ in range(5):
        progress.add(4)
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        f"reference: train pairs: {n}/20 rows ({p}%)"
        for n, p in (
            (4, 10),
            (4, 20),
            (8, 30),
            (8, 40),
            (12, 50),
            (12, 60),
            (16, 70),
            (16, 80),
            (20, 90),
            (20, 100),
        )
    ]
    monkeypatch.delenv("TQDM_DISABLE")
    quiet = io.StringIO()
    RowProgress("x", 10, stream=quiet).add(10)
    assert quiet.getvalue() == ""
