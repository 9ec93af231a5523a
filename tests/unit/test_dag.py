"""The stage graph against the code: dvc.yaml names every first-party module a stage's command imports,
imports flow one way (stage scripts -> library), the library imports without side effects, and the output
paths dvc.yaml declares are the library's (dpo_pipeline/layout.py). The params half of the DAG check needs
the stages to run: tests/e2e/test_dag_params.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_pipeline import layout
from tests.conftest import REPO
from tools import dag

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
STAGE_MODULES = dag.stage_modules(DVC_YAML)


def test_every_stage_runs_a_stage_script():
    assert set(STAGE_MODULES) == set(DVC_YAML["stages"])
    assert all(module.startswith("stages.") for module in STAGE_MODULES.values())


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_name_exactly_the_modules_its_command_imports(stage):
    wanted = set(dag.code_deps(STAGE_MODULES[stage]))
    declared = dag.declared_code_deps(DVC_YAML["stages"][stage])
    assert declared == wanted, (
        f"{stage}: missing {sorted(wanted - declared)}, not imported {sorted(declared - wanted)} "
        "(python -m tools.dag prints the list)"
    )


def test_the_import_walk_sees_function_level_imports(tmp_path):
    """The stages import lazily inside functions: the walk must count those (or a dep would be missed)."""
    pkg = tmp_path / "dpo_pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dpo_pipeline import b\n    return b\n")
    (pkg / "b.py").write_text(
        "import json\nimport typing\nfrom typing import TYPE_CHECKING\nfrom dpo_pipeline.c import X\n"
        "if TYPE_CHECKING:\n    from dpo_pipeline.d import Y\n"
        "if typing.TYPE_CHECKING:\n    import dpo_pipeline.d\n"
    )
    (pkg / "c.py").write_text("X = 1\n")
    (pkg / "d.py").write_text("Y = 1\n")
    # d is imported for annotations only (never at run time): no code dep
    assert dag.code_deps("dpo_pipeline.a", tmp_path) == [
        "dpo_pipeline/a.py",
        "dpo_pipeline/b.py",
        "dpo_pipeline/c.py",
    ]


def test_imports_flow_one_way():
    """Stage scripts import the library and nothing of each other; the library, bench and tools never a stage."""
    for path in sorted((REPO / "stages").glob("*.py")):
        others = {
            m for m in dag.imported_modules(path) if m.startswith("stages.") and m != f"stages.{path.stem}"
        }
        assert not others, f"{path.name} imports stage module(s) {sorted(others)}"
    for folder in ("dpo_pipeline", "bench", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            upward = {m for m in dag.imported_modules(path) if m.split(".")[0] == "stages"}
            assert not upward, f"{folder}/{path.name} imports stage module(s) {sorted(upward)}"
    for path in sorted((REPO / "dpo_pipeline").rglob("*.py")):
        tools = {m for m in dag.imported_modules(path) if m.split(".")[0] in ("tools", "bench")}
        assert not tools, f"{path.relative_to(REPO)} imports {sorted(tools)}"


def _library_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "dpo_pipeline").rglob("*.py")
    )


# The stages that train or score a reference: the only ones whose code may reach the training glue.
TRAINING_STAGES = {"reference", "train"}
TRAINING_GLUE = (
    "dpo_pipeline/train/trl_glue.py",
    "dpo_pipeline/train/shared_prompt.py",
    "dpo_pipeline/train/dpo.py",
)


def test_only_the_training_stages_depend_on_the_training_glue():
    """An edit to trl_glue, shared_prompt or the training module re-runs reference and train (and what their
    outputs feed), never validate, base, the data stages or the evaluations: none of them imports it."""
    modules = dag.stage_modules(DVC_YAML)
    assert TRAINING_STAGES <= set(modules)
    for stage, module in modules.items():
        reached = set(dag.code_deps(module)) & set(TRAINING_GLUE)
        if stage in TRAINING_STAGES:
            assert reached, f"{stage} no longer reaches the training glue: update TRAINING_STAGES"
        else:
            assert not reached, f"stage {stage} depends on training glue {sorted(reached)}"


def test_the_library_is_grouped_by_job():
    """dpo_pipeline/ is a small core plus data/, models/, train/, evaluate/; no package imports a stage's
    sibling package beyond the few named here (data: the eval tasks' documents for decontaminate, the base
    tokenizer's special tokens for prepare; models: the raw reader, filters and row
    shape (formats) for the builtin's corpus;
    evaluate and train: model loading and the data contract). A new cross-package import is a decision."""
    allowed = {
        "data": {"dpo_pipeline.evaluate.tasks", "dpo_pipeline.models.loading"},
        "models": {
            "dpo_pipeline.data.raw",
            "dpo_pipeline.data.chatml",
            "dpo_pipeline.data.filters",
            "dpo_pipeline.data.formats",
        },
        "evaluate": {"dpo_pipeline.data.chatml", "dpo_pipeline.models.loading"},
        "train": {"dpo_pipeline.models.loading", "dpo_pipeline.data.tables"},
    }
    packages = {p.name for p in (REPO / "dpo_pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(allowed)
    for package, ok in allowed.items():
        for path in sorted((REPO / "dpo_pipeline" / package).glob("*.py")):
            others = {
                m
                for m in dag.imported_modules(path)
                if len(m.split(".")) > 2 and m.split(".")[1] in packages and m.split(".")[1] != package
            }
            assert others <= ok, f"{path.relative_to(REPO)} imports {sorted(others - ok)}"


def test_library_imports_have_no_side_effects(tmp_path):
    """Importing every library module loads no ML framework, sets no environment variable, writes nothing."""
    modules = _library_modules()
    code = (
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "env = dict(os.environ)\n"
        f"for name in {modules!r}: __import__(name)\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'mlflow', 'datasets', 'lm_eval', 'bitsandbytes')\n"
        "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
        "print(json.dumps([sorted(m for m in heavy if m in sys.modules), changed]))\n"
    )
    before = sorted(tmp_path.iterdir())  # the autouse tracking fixture's mlflow.db
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    heavy, env_changed = json.loads(out.stdout)
    assert len(modules) > 30 and "dpo_pipeline.train.trl_glue" in modules
    assert heavy == [], f"importing the library loaded {heavy}"
    assert env_changed == [], f"importing the library set environment variables {env_changed}"
    assert sorted(tmp_path.iterdir()) == before


def _outs(stage: dict) -> set[str]:
    found = set()
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key, []):
            found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


def test_the_output_paths_are_the_layouts():
    """Each folder dvc.yaml declares as an output is a layout constant, and each layout output is declared."""
    declared = set().union(*(_outs(s) for s in DVC_YAML["stages"].values()))
    folders = {p for p in declared if not Path(p).suffix}
    named = {
        getattr(layout, name).as_posix()
        for name in dir(layout)
        if name.endswith("_DIR") and name not in ("SCRATCH_DIR", "TASKS_DIR", "METRICS_DIR", "PAIRS_DIR")
    }
    assert folders == named
    assert layout.VALIDATED_MARKER.as_posix() in declared
    for name in (layout.SELECTED_FILE, layout.ORDER_FILE):
        assert f"{layout.PAIRS_DIR.as_posix()}/{name}" in declared
    assert all(
        p.startswith(layout.METRICS_DIR.as_posix() + "/") for p in declared if p.endswith((".json", ".csv"))
    )
