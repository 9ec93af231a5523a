"""What each dvc.yaml stage's code really is: the first-party modules its command imports, walked from the code.

    python -m tools.dag            # per stage: the module files dvc.yaml must list as deps, and any missing
    python -m tools.dag --write    # rewrite each stage's .py deps in dvc.yaml to exactly those

tests/unit/test_dag.py checks that every stage lists exactly these (plus its data deps); this command prints
what to write when an import changes. Imports are read from the syntax tree, function-level ones included
(the stages import their heavy libraries lazily), so nothing runs; imports under `if TYPE_CHECKING:` are
left out (annotations only: they never run).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("dpo_pipeline", "stages", "tools")
MODULE_CMD = re.compile(r"\bpython -m ([\w.]+)")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a first-party module name (a package's __init__.py), or None when it is not ours."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    base = root / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """First-party module names `path` imports anywhere in its body (`from pkg import mod` counts as pkg.mod
    when mod is a module)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    # Imports under `if TYPE_CHECKING:` never run: a type annotation is no code a stage executes.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if module_file(name, root) is not None}


def closure(module: str, root: Path = REPO) -> set[Path]:
    """Every first-party module file `module` reaches through its imports, itself included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop(), root)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path, root))
    return seen


def code_deps(module: str, root: Path = REPO) -> list[str]:
    """The module files a stage command's deps must name (package __init__ files, empty by rule, left out)."""
    return sorted(p.relative_to(root).as_posix() for p in closure(module, root) if p.name != "__init__.py")


def stage_modules(dvc_yaml: dict) -> dict[str, str]:
    """{stage: the module its cmd runs with `python -m`}."""
    out = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        match = MODULE_CMD.search(stage["cmd"])
        if match:
            out[name] = match.group(1)
    return out


def declared_code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if isinstance(d, str) and d.endswith(".py")}


def write_code_deps(path: Path) -> None:
    """Replace each stage's `.py` deps in dvc.yaml by code_deps (first in its deps list), keeping every other
    line (comments, data deps, order) as it is."""
    import yaml

    text = path.read_text(encoding="utf-8")
    modules = stage_modules(yaml.safe_load(text))
    out: list[str] = []
    stage = None
    in_deps = False
    for line in text.splitlines(keepends=True):
        match = re.match(r"^  ([\w-]+):\s*$", line)
        if match:
            stage = match.group(1)
        if re.match(r"^    deps:\s*$", line) and stage in modules:
            out.append(line)
            out.extend(f"      - {dep}\n" for dep in code_deps(modules[stage]))
            in_deps = True
            continue
        if in_deps:
            if re.match(r"^      - \S+\.py\s*$", line):
                continue
            if not line.startswith("      - "):
                in_deps = False
        out.append(line)
    path.write_text("".join(out), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = parser.parse_args(argv)
    if args.write:
        write_code_deps(REPO / "dvc.yaml")
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    wrong = 0
    for name, module in stage_modules(dvc_yaml).items():
        wanted = set(code_deps(module))
        declared = declared_code_deps(dvc_yaml["stages"][name])
        print(f"{name}:")
        for path in sorted(wanted):
            print(f"      - {path}")
        for path in sorted(wanted - declared):
            print(f"  missing from dvc.yaml: {path}")
        for path in sorted(declared - wanted):
            print(f"  declared but not imported: {path}")
        wrong += bool(wanted ^ declared)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
