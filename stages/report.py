"""report stage: tuned vs base, every delta with its uncertainty, the base calibrated against published figures.

Reads: params `report`; metrics/eval_merged.json + eval_merged_docs.json (evaluate), metrics/eval_base.json
(evaluate_base), metrics/eval_base_heldout.json + eval_base_heldout_docs.json (evaluate_base_heldout),
metrics/pairs.json (the epochs a run made: report.max_epochs).
Also records the merged model as an MLflow logged model (tracking.log_model: its metrics, linked to the
train, merge and evaluate runs, pointing at models/merged's path, DVC md5 and commit; registered as
`<tracking.experiment>-merged` as tracking.register allows, and never when the scores are not meaningful);
metrics/report_run.json names it (not eval.json: ids differ on every run and are no DVC metric).
Writes: metrics/eval.json (flat numbers for `dvc metrics diff`: each tuned figure, `_base`, `_delta`, and per
delta `_delta_stderr`, `_p_value`, `_significant`; the averages; calibration figures) and metrics/eval_card.md
(the model card's evaluation section: tables of the same figures), metrics/headline_plot.json (the `headline`
plot's bars). Too few held-out pairs (report.min_heldout_pairs) or too many epochs (report.max_epochs) mark the
scores not meaningful (eval.json `meaningful`, meta.not_meaningful, the card, a warning).

No model runs here, so reading the scores another way (a significance level, a published figure, a tolerance)
re-runs only this stage, never an hour of scoring. How each figure is made:
- Deltas of held-out tasks are paired (the same documents for both models, matched by row id): McNemar's exact
  test for 0/1 metrics, else a normal test on the per-document differences; other tasks (the benchmarks)
  combine lm-eval's two standard errors as independent (conservative: they share documents too); an average
  combines its tasks' delta standard errors as independent.
- Length: the samples' and the held-out generations' mean and median answer lengths in tokens, and the
  held-out preference accuracy split by whether the chosen answer is the longer or the shorter one, with
  their mean as the length-controlled accuracy (dpo_heldout_pref/acc_norm_length_controlled).
- Calibration: each `report.published` figure of the base against our score of the base. A task off by more
  than `report.calibration_tolerance`, or scored with another few-shot count, is flagged: its deltas are not
  comparable to the published table's. `report.on_calibration_mismatch: fail` fails the stage instead, before
  anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline import runner
from dpo_pipeline.errors import StageError
from dpo_pipeline.evaluate.compare import (
    add_averages,
    add_uncertainty,
    bucket_counts,
    check_comparable,
    compare_scores,
)
from dpo_pipeline.evaluate.report import (
    calibrate,
    calibration_warning,
    card_section,
    meaningfulness,
    read_docs,
)
from dpo_pipeline.io import atomic_write_bytes, read_json, write_json
from dpo_pipeline.layout import MERGED_DIR, METRICS_DIR

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

SECTIONS = ["report"]
FILES = {
    "merged": "eval_merged.json",
    "merged_docs": "eval_merged_docs.json",
    "base": "eval_base.json",
    "base_heldout": "eval_base_heldout.json",
    "base_heldout_docs": "eval_base_heldout_docs.json",
}
HEADLINE_PLOT = (
    "headline_plot.json"  # dvc.yaml's `headline` plot: one bar per figure, one colour per revision
)


def headline_plot(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures as plot rows {figure, value}: held-out preference accuracy of base and tuned (and the
    length-normalised one), the format score. `dvc plots diff main beta02` draws them side by side."""
    rows = []
    for key, label in (
        ("dpo_heldout_pref/acc", "held-out preference accuracy"),
        ("dpo_heldout_pref/acc_norm", "held-out accuracy (length-normalised)"),
        ("chatml_format/format_ok", "answer format ok"),
    ):
        if key in out:
            rows.append({"figure": f"{label}, base", "value": round(float(out.get(key + "_base", 0.0)), 4)})
            rows.append({"figure": f"{label}, tuned", "value": round(float(out[key]), 4)})
    return rows


PAIRS_FILE = "pairs.json"
REPORT_RUN = "report_run.json"  # the MLflow model id this run recorded and whether it was registered  # the pairs stage's metrics: how many epochs over the training pairs a run makes


def _scores(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path}: scores not found (run the evaluate stages first: dvc repro evaluate)")
    return read_json(path)


def run(params: Params, metrics_dir: str | Path = METRICS_DIR) -> dict[str, Any]:
    """Write metrics/eval.json and metrics/eval_card.md; returns eval.json's content."""
    import logging

    from dpo_pipeline import lineage, tracking

    metrics_dir = Path(metrics_dir)
    r = params.report
    paths = {name: metrics_dir / file for name, file in FILES.items()}
    tuned = _scores(paths["merged"])
    meta = dict(tuned.get("meta", {}))
    base: dict[str, Any] = {}
    for name, stage in (("base", "evaluate_base"), ("base_heldout", "evaluate_base_heldout")):
        found = _scores(paths[name])
        check_comparable(meta, found.get("meta", {}), paths[name], stage)
        base.update({k: v for k, v in found.items() if k != "meta"})
        if name == "base":
            base_meta = found.get("meta", {})
    tuned_docs, base_docs = read_docs(paths["merged_docs"]), read_docs(paths["base_heldout_docs"])
    primary = meta.get("primary_metric", {})

    with tracking.stage_run("report", params, sections=SECTIONS, inputs=dict(paths)):
        scores = add_averages({k: v for k, v in tuned.items() if k != "meta"}, primary, str(paths["merged"]))
        base = add_averages(base, primary, f"{paths['base']} + {paths['base_heldout']}")
        out = compare_scores(scores, base)
        out, methods = add_uncertainty(
            out, primary, tuned_docs, base_docs, r.significance_level, str(paths["base_heldout_docs"])
        )
        figures, records = calibrate(base, meta.get("num_fewshot", {}), r)
        flagged = [rec for rec in records if rec["flagged"]]
        if flagged and r.on_calibration_mismatch == "fail":
            raise StageError(
                f"report.on_calibration_mismatch is fail: {calibration_warning(flagged[0])}"
                + (f" (and {len(flagged) - 1} more task(s))" if len(flagged) > 1 else "")
            )
        for rec in flagged:
            logging.getLogger("stages.report").warning(calibration_warning(rec))
        out.update(figures)
        pairs_path = metrics_dir / PAIRS_FILE
        epochs = read_json(pairs_path).get("epochs") if pairs_path.is_file() else None
        heldout = tuned_docs.get("dpo_heldout_pref", {}).get("ids")
        problems = meaningfulness(
            len(heldout) if heldout is not None else None, epochs, r.min_heldout_pairs, r.max_epochs
        )
        out["meaningful"] = 0.0 if problems else 1.0
        meta["not_meaningful"] = problems
        for problem in problems:
            logging.getLogger("stages.report").warning("scores not meaningful: %s", problem)
        meta.update(
            {
                "chat_template_sha_base": base_meta.get("chat_template_sha", ""),
                "significance_level": r.significance_level,
                "uncertainty": methods,
                "length_buckets": bucket_counts(tuned_docs),
                "calibration": records,
            }
        )
        # The merged model as an MLflow model: its metrics, the runs that made it, where DVC keeps it; a registry
        # version only as tracking.register allows (by default from a clean commit, never an experiment).
        git = lineage.git_tags()  # one `git status` for the registration rule and the model's tags
        register, made_from = tracking.registration(params.tracking.register, git, lineage.experiment_tags())
        if problems and register and params.tracking.register != "always":
            register, made_from = False, f"{made_from}, scores not meaningful"
        if not register:
            print(
                f"report: no model version registered: the run is from {made_from} and tracking.register is "
                f"{params.tracking.register} (set it to always to register every run)",
                file=sys.stderr,
            )
        model_id = tracking.log_model(
            name=f"{params.tracking.experiment}-merged",
            adapter_hash=str(meta.get("adapter_hash", "")),
            tags={
                "dvc.path": str(MERGED_DIR),
                "dvc.md5": lineage.dvc_lock_md5(MERGED_DIR) or "",
                "git.commit": git.get("git.commit", ""),
                "registered.from": made_from,
                **lineage.experiment_tags(),
                "lineage.adapter.hash": str(meta.get("adapter_hash", "")),
                # Found by content (the scores files hold no run ids, so a re-run with equal bytes re-runs nothing).
                "lineage.train_run_id": tracking.train_run_of(str(meta.get("adapter_sha256", ""))),
                "lineage.evaluate_run_id": tracking.find_run(
                    "evaluate", {"lineage.adapter.hash": str(meta.get("adapter_hash", ""))}
                ),
            },
            metrics=out,
            model_type="transformers-causal-lm (merged LoRA DPO; weights in DVC)",
            register=register,
        )
        report = {**out, "meta": meta}
        write_json(metrics_dir / "eval.json", report)
        # The run-dependent ids: an output, not a DVC metric (`dvc metrics diff` lists what changed in the scores).
        write_json(
            metrics_dir / REPORT_RUN,
            {"mlflow_model_id": model_id, "model_registered": register, "from": made_from},
        )
        write_json(metrics_dir / HEADLINE_PLOT, headline_plot(out))
        card = card_section(report, r.significance_level)
        atomic_write_bytes(metrics_dir / "eval_card.md", card.encode("utf-8"))
        tracking.log_metrics(out)
        tracking.set_tags(
            {
                "calibration.flagged": ",".join(f"{x['task']}/{x['metric']}" for x in flagged) or "none",
                "eval.significant_deltas": ",".join(
                    k[: -len("_significant")] for k, v in out.items() if k.endswith("_significant") and v
                )
                or "none",
            }
        )
        tracking.log_artifact(metrics_dir / "eval.json")
        tracking.log_artifact(metrics_dir / "eval_card.md")
    key = "dpo_heldout_pref/acc"
    if key in out:
        runner.summary(
            "report",
            f"held-out preference accuracy {out.get(key + '_base', float('nan')):.3f} -> {out[key]:.3f} "
            f"(paired stderr {out.get(key + '_delta_stderr', float('nan')):.3f}, p {out.get(key + '_p_value', float('nan')):.3g})"
            + (
                f"; NOT MEANINGFUL: {'; '.join(meta['not_meaningful'])}" if meta.get("not_meaningful") else ""
            ),
        )
    return report


def main() -> None:
    from dpo_pipeline import config

    def _run() -> None:
        run(config.load())

    runner.run_main(_run)


if __name__ == "__main__":
    main()
