"""tools.headline: the one-screen figures of the workspace, commits and DVC experiments, and the paired test
between them on the held-out documents both scored, in a real git repo."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.stats import paired
from tools import headline


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def write_run(root: Path, beta: float, acc: list[float], ids: list[str], margin: float) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(f"train:\n  method: dpo\n  beta: {beta}\n  loss_type: sigmoid\n")
    mean = sum(acc) / len(acc)
    scores = {"dpo_heldout_pref/acc": mean, "dpo_heldout_pref/acc_base": 0.5, "chatml_format/format_ok": 1.0}
    (root / "metrics" / "eval.json").write_text(json.dumps(scores))
    (root / "metrics" / "train.json").write_text(
        json.dumps({"eval_rewards_margins": margin, "train_runtime_s": 3.0})
    )
    docs = {"tasks": {"dpo_heldout_pref": {"ids": ids, "metrics": {"acc": acc}}}}
    (root / "metrics" / "eval_merged_docs.json").write_text(json.dumps(docs))


def test_commits_and_an_experiment_side_by_side_with_a_paired_test(tmp_path):
    _git(tmp_path, "init", "-q", "-b", "main")
    ids = [f"id{i}" for i in range(8)]
    a = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    write_run(tmp_path, 0.1, a, ids, 0.4)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    base = _git(tmp_path, "rev-parse", "HEAD")
    b = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # two documents fewer (other data): matched by id
    write_run(tmp_path, 0.3, b, ids[2:], 0.9)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "b")
    # a DVC experiment is a commit under refs/exps/<baseline>/<name>
    _git(tmp_path, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/beta03", "HEAD")
    _git(tmp_path, "reset", "-q", "--hard", base)

    out = json.loads(headline.run([base, "beta03"], as_json=True, cwd=tmp_path))
    first, second = out["columns"][base], out["columns"]["beta03"]
    assert first["params"]["beta"] == 0.1 and second["params"]["beta"] == 0.3
    assert (first["heldout_pairs"], second["heldout_pairs"], second["reward_margin"]) == (8, 6, 0.9)
    expected = paired(b, a[2:])
    test = out["paired_vs_first"]["beta03"]
    assert test["documents"] == 6.0
    assert test["delta"] == pytest.approx(expected["delta"]) and test["p_value"] == pytest.approx(
        expected["p_value"]
    )
    table = headline.run([base, "beta03"], cwd=tmp_path)
    assert "beta03" in table and f"{expected['delta']:+.3f}" in table and "6 docs" in table
    workspace = headline.run([], cwd=tmp_path)  # the checked-out files: the first run
    assert "workspace" in workspace and "beta 0.1" in workspace
    with pytest.raises(
        StageError, match="'nope': not a branch, tag or commit git knows, nor a DVC experiment"
    ):
        headline.run(["nope"], cwd=tmp_path)
