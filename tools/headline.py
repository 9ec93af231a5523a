"""headline: the figures a run is judged by, on one screen, for the workspace or any commits and experiments.

    python -m tools.headline                      # the workspace (what `make repro` prints at its end)
    python -m tools.headline main beta02 exp-x    # side by side: branches, tags, shas or `dvc exp run` names
    python -m tools.headline main beta02 --json

Reads: params.yaml and the files the stages write (metrics/eval.json, train.json, train_timing.json,
eval_merged_docs.json),
from the workspace or, for a rev, from git (`git show REV:metrics/...`; an experiment name is found among DVC's
experiment refs, refs/exps/.../NAME). Writes nothing.

Per column: the method and its key params; held-out preference accuracy base -> tuned with the paired standard
error and p-value of the change; the reward margin on the held-out pairs at the end of training; the greedy
answer length; ChatML format; train seconds. Between the first column and each other one: a paired test on the
held-out documents both scored (matched by row id), so "is B better than A beyond noise" has an answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dpo_pipeline.errors import StageError
from dpo_pipeline.runner import run_main

FILES = (
    "metrics/eval.json",
    "metrics/train.json",
    "metrics/train_timing.json",
    "metrics/eval_merged_docs.json",
    "params.yaml",
)
TASK = "dpo_heldout_pref"


def experiment_ref(name: str, cwd: str | Path | None = None) -> str | None:
    """The git ref of the DVC experiment called `name` (refs/exps/<baseline>/<name>), or None."""
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True, text=True, cwd=cwd
    ).stdout.split()
    matches = [ref for ref in out if ref.rsplit("/", 1)[-1] == name]
    return matches[-1] if matches else None


def read_rev(rev: str | None, cwd: str | Path | None = None) -> dict[str, Any]:
    """{file: parsed content} of FILES in the workspace (rev None) or at a git rev / experiment name."""
    out: dict[str, Any] = {}
    ref = None
    if rev is not None:
        ok = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True, cwd=cwd
        )
        ref = rev if ok.returncode == 0 else experiment_ref(rev, cwd)
        if ref is None:
            raise StageError(
                f"{rev!r}: not a branch, tag or commit git knows, nor a DVC experiment name here"
            )
    for name in FILES:
        if ref is None:
            path = Path(cwd or ".") / name
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        else:
            shown = subprocess.run(["git", "show", f"{ref}:{name}"], capture_output=True, text=True, cwd=cwd)
            text = shown.stdout if shown.returncode == 0 else None
        if text is not None:
            out[name] = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    if "metrics/eval.json" not in out:
        where = "the workspace" if rev is None else rev
        raise StageError(f"{where}: no metrics/eval.json (run the pipeline first: dvc repro)")
    return out


def headline(files: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one run (None where a file or key is missing)."""
    ev, tr = files.get("metrics/eval.json", {}), files.get("metrics/train.json", {})
    t = (files.get("params.yaml") or {}).get("train", {})
    method = t.get("method", "dpo")
    key = {"beta": t.get("beta"), "lr": t.get("learning_rate"), "steps": t.get("max_steps")}
    if method == "dpo":
        key["loss"] = t.get("loss_type")
    docs = files.get("metrics/eval_merged_docs.json", {}).get("tasks", {}).get(TASK, {})
    return {
        "method": method,
        "params": key,
        "acc_base": ev.get(f"{TASK}/acc_base"),
        "acc": ev.get(f"{TASK}/acc"),
        "acc_delta_stderr": ev.get(f"{TASK}/acc_delta_stderr"),
        "acc_p_value": ev.get(f"{TASK}/acc_p_value"),
        "not_meaningful": (ev.get("meta") or {}).get("not_meaningful") or [],
        "heldout_pairs": len(docs.get("ids", [])) or None,
        "reward_margin": tr.get("eval_rewards_margins"),
        "answer_tokens": ev.get("chatml_format/length_mean_tokens"),
        "format_ok": ev.get("chatml_format/format_ok"),
        "train_seconds": files.get("metrics/train_timing.json", {}).get(
            "train_runtime_s", tr.get("train_runtime_s")
        ),
    }


def paired_between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float] | None:
    """Paired test of held-out accuracy, B - A, on the documents both scored (by row id); None if none."""
    from dpo_pipeline.evaluate.stats import paired

    def per_doc(files: dict[str, Any]) -> dict[str, float]:
        task = files.get("metrics/eval_merged_docs.json", {}).get("tasks", {}).get(TASK, {})
        return dict(zip(task.get("ids", []), task.get("metrics", {}).get("acc", []), strict=False))

    da, db = per_doc(a), per_doc(b)
    common = sorted(set(da) & set(db))
    if not common:
        return None
    result = paired([db[i] for i in common], [da[i] for i in common])
    return {**result, "documents": float(len(common))}


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(columns: list[tuple[str, dict[str, Any]]], tests: list[dict[str, float] | None]) -> str:
    rows = [
        ("method", lambda h: h["method"]),
        ("key params", lambda h: ", ".join(f"{k} {v}" for k, v in h["params"].items() if v is not None)),
        (
            "held-out acc",
            lambda h: (
                f"{_num(h['acc_base'], 3)} -> {_num(h['acc'], 3)} ± {_num(h['acc_delta_stderr'], 3)}"
                f" (p {_num(h['acc_p_value'], 3)})"
            ),
        ),
        (
            "held-out pairs",
            lambda h: _num(h["heldout_pairs"], 0) + (" NOT MEANINGFUL" if h["not_meaningful"] else ""),
        ),
        ("reward margin", lambda h: _num(h["reward_margin"], 3)),
        ("answer tokens", lambda h: _num(h["answer_tokens"], 1)),
        ("format ok", lambda h: _num(h["format_ok"], 3)),
        ("train seconds", lambda h: _num(h["train_seconds"], 1)),
    ]
    if len(columns) > 1:
        first = columns[0][0]
        rows.append(
            (
                f"vs {first} (paired)",
                lambda h: h.get("_test", ""),
            )
        )
        for (_name, h), test in zip(columns[1:], tests, strict=True):
            h["_test"] = (
                "no common documents"
                if test is None
                else f"{test['delta']:+.3f} ± {test['delta_stderr']:.3f}, p {test['p_value']:.3f}, "
                f"{int(test['documents'])} docs"
            )
        columns[0][1]["_test"] = ""
    names = [name for name, _ in columns]
    cells = [[label, *(str(get(h)) for _n, h in columns)] for label, get in rows]
    widths = [max(len(r[i]) for r in [["", *names], *cells]) for i in range(len(names) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(["", *names], widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def run(revs: list[str], as_json: bool = False, cwd: str | Path | None = None) -> str:
    named = [(rev, read_rev(rev, cwd)) for rev in revs] or [("workspace", read_rev(None, cwd))]
    columns = [(name, headline(files)) for name, files in named]
    tests = [paired_between(named[0][1], files) for _name, files in named[1:]]
    if as_json:
        return json.dumps(
            {"columns": dict(columns), "paired_vs_first": dict(zip(revs[1:], tests, strict=True))}, indent=2
        )
    return format_table(columns, tests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.headline", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "revs", nargs="*", help="branches, tags, shas or dvc experiment names (none: workspace)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    run_main(lambda: print(run(args.revs, args.json)))


if __name__ == "__main__":
    sys.exit(main())
