"""Issue 27, point 5: `dvc plots show` writes a page that renders with no internet (plots/offline.html, DVC's
page with vega, vega-lite and vega-embed inlined, set as plots.html_template in .dvc/config), holding the
held-out curve over training steps, chosen and rejected rewards, and the headline bars."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow


def plot_specs(html: str) -> dict[str, dict]:
    """{plot id: its vega-lite spec} as DVC writes them: `var spec = {...};` then `vegaEmbed('#id', spec);`."""
    found = re.findall(r"var spec = (\{.*?\});\s*vegaEmbed\('#([^']+)', spec\);", html, re.S)
    return {name: json.loads(spec) for spec, name in found}


def test_the_plots_page_renders_offline_with_the_held_out_curve(tiny_project, tmp_path):
    out = tmp_path / "plots"
    tiny_project.dvc("plots", "show", "-o", str(out))
    html = (out / "index.html").read_text(encoding="utf-8")
    # nothing is loaded from the network: no external script, stylesheet or image
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    for library in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"<script>/* {library} */" in html, library
    specs = plot_specs(html)
    assert {
        "loss",
        "heldout_reward_accuracy",
        "heldout_reward_margin",
        "rewards_chosen_rejected",
        "headline",
    } <= set(specs)
    curve = specs["heldout_reward_accuracy"]["data"]["values"]
    steps = sorted(int(float(row["step"])) for row in curve)
    params = tiny_project.params()["train"]
    assert steps == list(range(params["eval_steps"], params["max_steps"] + 1, params["eval_steps"]))
    assert all(0.0 <= float(row["eval_rewards/accuracies"]) <= 1.0 for row in curve)
    bars = {row["figure"]: row["value"] for row in specs["headline"]["data"]["values"]}
    scores = tiny_project.read_json("metrics/eval.json")
    assert bars["held-out preference accuracy, tuned"] == pytest.approx(
        scores["dpo_heldout_pref/acc"], abs=1e-4
    )
    assert bars["held-out preference accuracy, base"] == pytest.approx(
        scores["dpo_heldout_pref/acc_base"], abs=1e-4
    )
