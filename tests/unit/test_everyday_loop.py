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
