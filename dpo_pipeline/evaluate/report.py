"""The report: tuned vs base scores with their uncertainty, the base calibrated against its published figures,
and the evaluation section of the model card. No model runs here: only the evaluate stages' files are read."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError


def calibrate(
    base: dict[str, Any], base_fewshot: dict[str, int], report: Any
) -> tuple[dict[str, float], list]:
    """Each published figure of the base (`report.published`) against our score of the base.

    Returns flat figures (`<task>/<metric>_published`, `_vs_published` = ours - published, `_calibrated` 1/0,
    and `calibration/stated`, `calibration/flagged`) and one record per figure for meta and the card. A task
    is flagged when |ours - published| > report.calibration_tolerance, when it was scored with another few-shot
    count than the figure states, or when we have no such score: its deltas are then not comparable to the
    published table's."""
    figures: dict[str, float] = {}
    records = []
    for item in report.published:
        key = f"{item.task}/{item.metric}"
        ours = base.get(key)
        record: dict[str, Any] = {
            "task": item.task,
            "metric": item.metric,
            "published": item.value,
            "num_fewshot": item.num_fewshot,
            "source": item.source,
            "confirmed": item.confirmed,
        }
        problems = []
        if base_fewshot.get(item.task) != item.num_fewshot:
            problems.append(
                f"scored {base_fewshot.get(item.task)}-shot, the figure is {item.num_fewshot}-shot"
            )
        if not isinstance(ours, (int, float)):
            problems.append(f"no {key} score of the base")
        else:
            diff = float(ours) - item.value
            record.update(ours=float(ours), difference=round(diff, 6))
            figures[f"{key}_published"] = item.value
            figures[f"{key}_vs_published"] = round(diff, 6)
            if abs(diff) > report.calibration_tolerance + 1e-12:
                problems.append(
                    f"ours {float(ours):.4f} vs published {item.value:.4f} "
                    f"(off by {abs(diff):.4f} > tolerance {report.calibration_tolerance})"
                )
        record["flagged"] = bool(problems)
        record["why"] = "; ".join(problems)
        if isinstance(ours, (int, float)):
            figures[f"{key}_calibrated"] = 0.0 if problems else 1.0
        records.append(record)
    figures["calibration/stated"] = float(len(records))
    figures["calibration/flagged"] = float(sum(r["flagged"] for r in records))
    return figures, records


def calibration_warning(record: dict[str, Any]) -> str:
    return (
        f"{record['task']}/{record['metric']}: your harness does not reproduce the published setup "
        f"({record['why']}): deltas on this task are not comparable to the article's"
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _delta_cells(report: dict[str, Any], key: str) -> str:
    """The tuned | base | delta | +- stderr | p | significant cells of one figure's row."""
    cells = [_fmt(report.get(key + suffix)) for suffix in ("", "_base", "_delta", "_delta_stderr")]
    cells.append(_fmt(report.get(f"{key}_p_value"), 3))
    cells.append("yes" if report.get(f"{key}_significant") else "no")
    return " | ".join(cells)


def meaningfulness(
    heldout_pairs: int | None, epochs: float | None, min_pairs: int, max_epochs: float
) -> list[str]:
    """Why the scores are not meaningful (empty: they are): too few held-out pairs for the paired test to see a
    typical gain (report.min_heldout_pairs), or so many passes over the training pairs that DPO memorises them
    (report.max_epochs)."""
    problems = []
    if heldout_pairs is not None and heldout_pairs < min_pairs:
        problems.append(
            f"only {heldout_pairs} held-out pairs (report.min_heldout_pairs {min_pairs}): the paired test cannot "
            "detect a typical gain"
        )
    if epochs is not None and epochs > max_epochs:
        problems.append(
            f"{epochs:.1f} epochs over the training pairs (report.max_epochs {max_epochs:g}): DPO memorises them"
        )
    return problems


def card_section(report: dict[str, Any], level: float) -> str:
    """Markdown: the evaluation table (tuned, base, delta +- stderr, significance), calibration and length."""
    meta = report["meta"]
    lines = [
        "## Evaluation",
        "",
        f"Scores of the tuned (merged) model and of its base, with lm-evaluation-harness {meta.get('lm_eval_version', '')},"
        f" seed {meta.get('seed')}, limit {meta.get('limit') or 'none'}. A delta is marked significant when its"
        f" two-sided p-value is below {level}.",
        "",
        *(
            [
                f"**Not meaningful:** {'; '.join(meta['not_meaningful'])}. Read the figures below as a smoke test.",
                "",
            ]
            if meta.get("not_meaningful")
            else []
        ),
        "| task | metric | few-shot | tuned | base | delta | +- stderr | p | significant | test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, key in meta.get("primary_metric", {}).items():
        metric = key.split("/", 1)[1]
        fewshot = meta.get("num_fewshot", {}).get(task, "")
        test = meta.get("uncertainty", {}).get(task, "")
        lines.append(f"| {task} | {metric} | {fewshot} | {_delta_cells(report, key)} | {test} |")
    for name in ("average", "open_llm_v1/average"):
        if name in report:
            lines.append(f"| {name} | | | {_delta_cells(report, name)} | tasks combined as independent |")
    records = meta.get("calibration", [])
    lines += ["", "### Calibration against published figures of the base", ""]
    if not records:
        lines.append("No published figures are stated for this base (`report.published`).")
    else:
        lines += [
            "| task | metric | published | ours | difference | source | confirmed | flag |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in records:
            lines.append(
                f"| {r['task']} | {r['metric']} | {_fmt(r['published'])} | {_fmt(r.get('ours'))} | "
                f"{_fmt(r.get('difference'))} | {r['source']} | {'yes' if r['confirmed'] else 'no'} | "
                f"{'**not comparable**: ' + r['why'] if r['flagged'] else 'ok'} |"
            )
    lengths = [k for k in report if k.endswith("_tokens") and not k.endswith(("_base", "_delta"))]
    buckets = [k for k in report if k.endswith(("_chosen_longer", "_chosen_shorter", "_length_controlled"))]
    if lengths or buckets:
        lines += ["", "### Length", "", "| figure | tuned | base | delta |", "|---|---|---|---|"]
        for key in sorted(lengths) + sorted(buckets):
            lines.append(
                f"| {key} | {_fmt(report.get(key))} | {_fmt(report.get(f'{key}_base'))} | "
                f"{_fmt(report.get(f'{key}_delta'))} |"
            )
    return "\n".join(lines) + "\n"


def read_docs(path: Path) -> dict[str, Any]:
    from dpo_pipeline.io import read_json

    if not path.is_file():
        raise StageError(f"{path}: per-document results not found (run the stage that writes it first)")
    return read_json(path).get("tasks", {})
