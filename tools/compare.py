"""compare: metric differences between the MLflow runs of two commits, without checking out their files.

    python -m tools.compare REV_A REV_B [--experiment NAME] [--stage STAGE] [--tracking-uri URI]

A REV is a branch, tag or sha, or the name of a `dvc exp run` (`exp:NAME`, or just NAME when git does not know
it): its runs carry the tag dvc.exp.name (dpo_pipeline/lineage.py experiment_tags).

Reads: the MLflow store (--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db as the stages use);
the experiment name from params.yaml `tracking.experiment` unless --experiment is given; git, to turn a
branch, tag or short sha into the full commit sha. A full 40-character sha is taken as is, so runs made on
another machine (pushed to a shared tracking server) can be compared even if this clone lacks the commit.
Writes: nothing; prints one table per stage: metric, A, B, delta (B - A).

For each rev and stage the latest FINISHED run tagged `git.commit = <sha>` and `stage = <stage>` is used
(the tags dpo_pipeline/tracking.py writes: the commit checked out when the stage ran). When the rev itself has no
runs, e.g. a branch whose tip only commits the dvc.lock that `dvc repro` wrote, its first-parent ancestors
are searched (up to --max-back commits) and the table says which commit the runs belong to. A run made
with uncommitted changes (`git.dirty = true`) is still used but flagged, since its commit does not fully
describe what ran.
Exit status: 0 with a table, 1 when a rev cannot be resolved or no finished run exists for either rev.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.runner import run_main

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class MetricDiff:
    metric: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        if self.a is None or self.b is None:
            return None
        return self.b - self.a

    @property
    def changed(self) -> bool:
        if self.a is None or self.b is None:
            return (self.a is None) != (self.b is None)
        if math.isnan(self.a) and math.isnan(self.b):
            return False
        return self.a != self.b


@dataclass(frozen=True)
class RunInfo:
    """What compare needs from one MLflow run (kept plain so the table code is testable without MLflow)."""

    run_id: str
    stage: str
    commit: str
    dirty: bool
    start_time: int
    metrics: dict[str, float]


def diff_metrics(a: dict[str, float], b: dict[str, float]) -> list[MetricDiff]:
    """Every metric present in either run, sorted by name; a metric missing on one side has None there."""
    return [MetricDiff(name, a.get(name), b.get(name)) for name in sorted(set(a) | set(b))]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _fmt_delta(diff: MetricDiff) -> str:
    delta = diff.delta
    if delta is None:
        return "-"
    if delta == 0:
        return "0"
    text = _fmt(delta)
    return text if text.startswith("-") else "+" + text


def format_table(rows: list[MetricDiff], only_changed: bool = False) -> str:
    """A plain-text table: metric | A | B | delta, columns padded to the widest cell."""
    shown = [r for r in rows if r.changed] if only_changed else rows
    cells = [("metric", "A", "B", "delta")]
    cells += [(r.metric, _fmt(r.a), _fmt(r.b), _fmt_delta(r)) for r in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = []
    for index, row in enumerate(cells):
        left = row[0].ljust(widths[0])
        right = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([left, *right]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not shown:
        lines.append("(no metrics)" if not rows else "(no metric changed)")
    return "\n".join(lines)


def pipeline_order(dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The stages in dvc.yaml's order (the pipeline's), or none when there is no dvc.yaml here."""
    import yaml

    path = Path(dvc_yaml)
    if not path.is_file():
        return []
    return list((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {}))


def format_report(
    rev_a: str, rev_b: str, runs_a: dict[str, RunInfo], runs_b: dict[str, RunInfo], only_changed: bool = False
) -> str:
    """One section per stage found for either rev, in pipeline order, then any other stage by name."""
    order = pipeline_order()
    stages = sorted(
        set(runs_a) | set(runs_b), key=lambda s: (order.index(s) if s in order else len(order), s)
    )
    out = []
    for stage in stages:
        run_a, run_b = runs_a.get(stage), runs_b.get(stage)
        out.append(f"== {stage} ==")
        out.append(f"A: {_describe(rev_a, run_a)}")
        out.append(f"B: {_describe(rev_b, run_b)}")
        rows = diff_metrics(run_a.metrics if run_a else {}, run_b.metrics if run_b else {})
        out.append(format_table(rows, only_changed=only_changed))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _describe(rev: str, run: RunInfo | None) -> str:
    if run is None:
        return f"{rev}: no FINISHED run of this stage"
    dirty = " (uncommitted changes: git.dirty=true)" if run.dirty else ""
    label = rev if rev == run.commit else f"{rev} = {run.commit[:12]}"
    return f"{label}, run {run.run_id}{dirty}"


def resolve_rev(rev: str, cwd: str | Path | None = None) -> str:
    """A branch/tag/short sha -> full commit sha via git; a full sha passes even if git does not know it."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        result = None
    if result is not None and result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip()
    if FULL_SHA.match(rev.lower()):
        return rev.lower()
    raise StageError(
        f"cannot resolve {rev!r} to a commit: not a branch, tag or sha known to git here "
        "(give the full 40-character sha to compare runs of a commit this clone does not have)"
    )


def first_parent_ancestors(sha: str, max_back: int, cwd: str | Path | None = None) -> list[str]:
    """`sha` and up to `max_back` first-parent ancestors, newest first (just [sha] if git lacks it)."""
    try:
        result = subprocess.run(
            ["git", "rev-list", "--first-parent", f"--max-count={max_back + 1}", sha],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return [sha]
    shas = result.stdout.split() if result.returncode == 0 else []
    return shas or [sha]


def find_runs(
    client: Any, experiment_id: str, candidates: list[str], stage: str | None = None
) -> tuple[str, dict[str, RunInfo]]:
    """The first candidate commit (newest first) that has finished runs, and its latest run per stage."""
    for commit in candidates:
        runs = latest_runs(client, experiment_id, commit, stage)
        if runs:
            return commit, runs
    return candidates[0], {}


def latest_runs(
    client: Any, experiment_id: str, commit: str, stage: str | None = None, tag: str = "git.commit"
) -> dict[str, RunInfo]:
    """The latest FINISHED run per stage for one commit (or, with `tag` dvc.exp.name, one experiment name)."""
    filters = [f"tags.`{tag}` = '{commit}'", "attributes.status = 'FINISHED'"]
    if stage:
        filters.append(f"tags.stage = '{stage}'")
    runs = client.search_runs(
        [experiment_id], filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"]
    )
    latest: dict[str, RunInfo] = {}
    for run in runs:
        name = run.data.tags.get("stage")
        if not name or name in latest:
            continue
        if tag == "git.commit" and run.data.tags.get("dvc.exp.name"):
            continue  # an experiment run on this commit ran other params: it is compared by its name
        latest[name] = RunInfo(
            run_id=run.info.run_id,
            stage=name,
            commit=run.data.tags.get("git.commit", commit),
            dirty=run.data.tags.get("git.dirty") == "true",
            start_time=run.info.start_time,
            metrics=dict(run.data.metrics),
        )
    return latest


def default_experiment() -> str:
    from dpo_pipeline import config

    return config.load().tracking.experiment


def run(
    rev_a: str,
    rev_b: str,
    experiment: str,
    stage: str | None = None,
    tracking_uri: str | None = None,
    only_changed: bool = False,
    max_back: int = 10,
) -> str:
    from mlflow.tracking import MlflowClient

    from dpo_pipeline.tracking import default_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as err:  # noqa: BLE001 - any store error becomes one clear line
        raise StageError(f"cannot read the MLflow store {uri}: {type(err).__name__}: {err}") from err
    if found is None:
        raise StageError(f"MLflow store {uri} has no experiment {experiment!r}")

    def runs_of(rev: str) -> tuple[str, str, dict[str, RunInfo]]:
        """(what rev names, the commit or experiment whose runs are used, those runs): `exp:NAME`, or a rev git
        cannot resolve here, is a `dvc exp run` name (the runs tagged dvc.exp.name); else a commit."""
        name = rev[len("exp:") :] if rev.startswith("exp:") else None
        if name is None:
            try:
                sha = resolve_rev(rev)
            except StageError:
                by_name = latest_runs(client, found.experiment_id, rev, stage, tag="dvc.exp.name")
                if not by_name:
                    raise
                return f"experiment {rev}", f"experiment {rev}", by_name
            used, runs = find_runs(client, found.experiment_id, first_parent_ancestors(sha, max_back), stage)
            return sha, used, runs
        return (
            f"experiment {name}",
            f"experiment {name}",
            latest_runs(client, found.experiment_id, name, stage, tag="dvc.exp.name"),
        )

    sha_a, used_a, runs_a = runs_of(rev_a)
    sha_b, used_b, runs_b = runs_of(rev_b)
    what = f"stage {stage!r}" if stage else "any stage"
    missing = [
        f"{rev} ({sha})" for rev, sha, runs in ((rev_a, sha_a, runs_a), (rev_b, sha_b, runs_b)) if not runs
    ]
    if missing:
        raise StageError(
            f"no FINISHED run of {what} in experiment {experiment!r} at {uri} for: {', '.join(missing)} "
            f"(nor for its last {max_back} first-parent ancestors)"
        )
    header = [f"MLflow {uri}, experiment {experiment!r}"]
    for label, rev, sha, used in (("A", rev_a, sha_a, used_a), ("B", rev_b, sha_b, used_b)):
        line = f"{label} = {rev} ({sha})"
        if used != sha:
            line += f": no runs at this commit; using the runs of its ancestor {used}"
        header.append(line)
    return "\n".join(header) + "\n\n" + format_report(rev_a, rev_b, runs_a, runs_b, only_changed=only_changed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.split("\n")[0])
    parser.add_argument("rev_a", help="branch, tag or sha (a full sha need not exist in this clone)")
    parser.add_argument("rev_b", help="branch, tag or sha")
    parser.add_argument("--experiment", help="MLflow experiment (default: params.yaml tracking.experiment)")
    parser.add_argument("--stage", help="compare only this stage (e.g. evaluate)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--changed", action="store_true", help="show only metrics that differ")
    parser.add_argument(
        "--max-back",
        type=int,
        default=10,
        help="first-parent ancestors searched when a rev has no runs itself (default: 10; 0 = exact commit only)",
    )
    args = parser.parse_args(argv)

    def go() -> None:
        experiment = args.experiment or default_experiment()
        report = run(
            args.rev_a, args.rev_b, experiment, args.stage, args.tracking_uri, args.changed, args.max_back
        )
        sys.stdout.write(report)

    run_main(go)


if __name__ == "__main__":
    main()
