"""Does constraints.txt install on a fresh machine? Resolve it against the public index only.

Runs `pip install --isolated --dry-run --ignore-installed --report` for the project and its dev extra under
constraints.txt: `--isolated` ignores pip's config files and PIP_* variables, so no local wheel folder
(find-links) or extra index of this machine takes part. Nothing is installed; pip reads metadata (it may
download a wheel where the index has no separate metadata). Then checks the report: every pinned package
resolved at its pinned version, no local version label (`+cpu`), nothing from a file:// location.

Usage: python -m tools.lock_check [--report PATH]   (make lock-check; about 25 s here)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path("constraints.txt")


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} from a pip constraints file of `name==version` lines."""
    pins = {}
    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{path}:{line_no}: expected name==version, got {raw!r}")
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def local_labels(pins: dict[str, str]) -> list[str]:
    """Pins with a local version label (`torch==2.13.0+cpu`), which only a local wheel folder serves."""
    return sorted(f"{name}=={version}" for name, version in pins.items() if Version(version).local)


def platform_only(report: dict, pins: dict[str, str], root: str = "torch") -> set[str]:
    """Unpinned packages that only `root` brings in: torch's CUDA build on Linux requires its CUDA libraries
    (nvidia-*, triton) at exact versions in its own metadata; the CPU wheel here requires none of them, so the
    lock cannot list them. They are those reachable from `root` through unpinned packages alone."""
    metadata = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report.get("install", [])}

    def requirements(name: str, extras: set[str]) -> list[Requirement]:
        reqs = [Requirement(line) for line in metadata[name].get("requires_dist") or []]
        return [
            r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *extras})
        ]

    found: set[str] = set()
    todo = [r for r in requirements(root, set()) if canonicalize_name(r.name) not in pins]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or name in pins or name not in metadata:
            continue
        found.add(name)
        todo.extend(requirements(name, set(req.extras)))
    return found


def check_report(report: dict, pins: dict[str, str]) -> list[str]:
    """Problems in a `pip install --report` against the pins (empty: the lock resolves as pinned)."""
    problems = []
    torch_only = platform_only(report, pins)
    for item in report.get("install", []):
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        url = item.get("download_info", {}).get("url", "")
        if name == "dpo-pipeline":
            continue
        if Version(version).local:
            problems.append(f"{name}=={version}: a local version label")
        if url.startswith("file:"):
            problems.append(f"{name}=={version}: resolved from a local path ({url})")
        if name not in pins and name not in torch_only:
            problems.append(f"{name}=={version}: resolved but not pinned in {CONSTRAINTS}")
        elif name in pins and pins[name] != version:
            problems.append(f"{name}: pinned {pins[name]}, resolved {version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="keep pip's JSON report here")
    args = parser.parse_args(argv)
    pins = read_pins()
    labels = local_labels(pins)
    if labels:
        print(f"error: {CONSTRAINTS} pins local version labels: {', '.join(labels)}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        report_path = args.report or Path(tmp) / "report.json"
        argv_pip = [
            sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
            "--quiet", "--report", str(report_path), "-c", str(CONSTRAINTS), ".[dev]",
        ]  # fmt: skip
        result = subprocess.run(argv_pip, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            print("error: constraints.txt does not resolve against the public index", file=sys.stderr)
            return 1
        report = json.loads(report_path.read_text(encoding="utf-8"))
    problems = check_report(report, pins)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    torch = next(i for i in report["install"] if i["metadata"]["name"] == "torch")
    extra = sorted(platform_only(report, pins))
    print(
        f"lock-check: {len(report['install'])} packages resolve from the public index as pinned; "
        f"torch {torch['metadata']['version']} brings {len(extra)} more of its own build "
        f"({', '.join(extra) or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
