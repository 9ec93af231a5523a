"""The params half of the DAG check: in the session's `dvc repro`, each stage reads exactly the params it
declares in dvc.yaml (every key it reads is declared, every declared key or section is read).

Evidence, not a list kept by hand: with DPO_PARAMS_TRACE set, dpo_pipeline.config.load() hands out a view
that records each dotted key read, and each process writes its keys with its command line (tests/e2e/
conftest.py sets it for the session repro). Excluded on purpose: `tracking.*` (where MLflow records runs:
never an input of what a stage produces, so not a DVC param) and `validate`, which checks the whole file
and so declares params.yaml itself as a dep.
"""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

pytestmark = pytest.mark.slow

NOT_DVC_PARAMS = ("tracking", "launch")  # sections that never change what a stage produces
# Declared for a branch the tiny profile does not take: prepare reads these only with data.source: hub (that
# path runs in tests/unit/test_prepare_validate.py); on a local source an edit of them re-runs prepare for
# nothing, which is the price of one static dvc.yaml for both sources.
OTHER_BRANCH = {"prepare": {"data.hub_name", "data.hub_revision", "data.hub_split"}}


def covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def reads_by_stage(project) -> dict[str, set[str]]:
    dvc_yaml = yaml.safe_load((project.root / "dvc.yaml").read_text())
    by_cmd = {tuple(shlex.split(s["cmd"])[1:]): name for name, s in dvc_yaml["stages"].items()}
    reads: dict[str, set[str]] = {}
    for path in sorted(project.params_trace.glob("*.json")):
        record = json.loads(path.read_text())
        argv = record["argv"]
        # `python -m stages.x args` shows up as argv ['/path/stages/x.py', args...]; torchrun workers too
        module = "stages." + argv[0].rsplit("/", 1)[-1].removesuffix(".py")
        stage = by_cmd.get(("-m", module, *argv[1:]))
        if stage is not None:
            reads.setdefault(stage, set()).update(record["reads"])
    return reads


def test_each_stage_reads_exactly_the_params_it_declares(tiny_project):
    dvc_yaml = yaml.safe_load((tiny_project.root / "dvc.yaml").read_text())
    reads = reads_by_stage(tiny_project)
    checked = [name for name in dvc_yaml["stages"] if name != "validate"]
    assert set(checked) <= set(reads), f"no params trace for {sorted(set(checked) - set(reads))}"
    problems = []
    for stage in checked:
        declared = {p for p in dvc_yaml["stages"][stage].get("params", []) if isinstance(p, str)}
        read = {k for k in reads[stage] if k.split(".")[0] not in NOT_DVC_PARAMS}
        undeclared = sorted(k for k in read if not covered(k, declared))
        unread = sorted(
            d
            for d in declared - OTHER_BRANCH.get(stage, set())
            if not any(k == d or k.startswith(d + ".") for k in read)
        )
        if undeclared:
            problems.append(f"{stage} reads undeclared {undeclared}")
        if unread:
            problems.append(f"{stage} declares unread {unread}")
    assert not problems, "\n".join(problems)


def test_the_trace_sees_a_read(tmp_path, monkeypatch):
    """The recorder itself: a key read through the view is recorded, sections as their dotted leaves."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "from dpo_pipeline import config\n"
        f"p = config.load({str(REPO / 'params.yaml')!r})\n"
        "t = p.train\n"
        "t.lora.r, p.seed, p.eval.tasks\n"
    )
    env = {"DPO_PARAMS_TRACE": str(tmp_path), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["reads"] == ["eval.tasks", "seed", "train.lora.r"]
