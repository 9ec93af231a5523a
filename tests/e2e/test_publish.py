"""Issue 17, points 2-3: `make publish` (tools.publish) on a clone of the session's tiny project. The hub is not
reachable from here, so: the dry run's folder and model card, the refusals (uncommitted changes, stale outputs,
no token), and the clear error when the hub cannot be reached (a closed port on loopback)."""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import Project, free_port

pytestmark = pytest.mark.slow

REPO = "someone/tiny-dpo"


def folder_of(project, kind: str = "merged"):
    return project.root / ".scratch" / "publish" / f"someone--tiny-dpo-{kind}"


def test_dry_run_writes_the_hub_ready_folder_and_card(clone):
    project = clone("publish-dry")
    out = project.python("-m", "tools.publish", REPO, "--dry-run").stdout
    folder = folder_of(project)
    assert f"{folder.relative_to(project.root)}/ holds exactly what would be uploaded to {REPO}" in out
    names = sorted(p.name for p in folder.iterdir())
    merged = project.root / "models" / "merged"
    # the model's files and the card; the pipeline's bookkeeping (pipeline_merge.json) stays in the repo
    assert set(names) == {p.name for p in merged.iterdir() if p.is_file()} - {"pipeline_merge.json"} | {
        "README.md"
    }
    assert "model.safetensors" in names and "tokenizer.json" in names and "tokenizer_config.json" in names
    # the weights are the DVC workspace's own files (hard links), byte for byte
    assert (folder / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
    card = (folder / "README.md").read_text()
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    data = ModelCard(card).data  # the hub's own parser of the header
    assert data.base_model is None  # the builtin base is not a hub model: named in the text instead
    assert "builtin demo model tiny-chatml-mistral" in card
    assert (
        data.library_name == "transformers" and "dpo" in data.tags and data.pipeline_tag == "text-generation"
    )
    assert data.license == "other"  # the builtin base has no card of its own to take a license from
    _name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    scores = project.read_json("metrics/eval.json")
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    assert got[("dpo_heldout_pref", "acc")] == round(scores["dpo_heldout_pref/acc"], 4)
    assert got[("chatml_format", "format_ok")] == round(scores["chatml_format/format_ok"], 4)
    head = project.head()
    assert f"| git commit | {head} |" in card
    lock = (project.root / "dvc.lock").read_text()
    merged_md5 = re.search(r"- path: models/merged\n\s+hash: md5\n\s+md5: (\S+)", lock).group(1)
    assert merged_md5 in card
    assert "| pairs trained on (data/pairs) |" in card
    # the evaluation table with deltas and their uncertainty, from the report stage
    assert "| dpo_heldout_pref | acc_norm |" in card and "+- stderr" in card
    # how to load it, with the chat template
    assert f'AutoTokenizer.from_pretrained("{REPO}")' in card and "apply_chat_template" in card
    assert project.git("status", "--porcelain").stdout == ""  # .scratch is ignored: the tree stays clean


def test_dry_run_of_the_adapter(clone):
    project = clone("publish-adapter")
    project.python("-m", "tools.publish", REPO, "--adapter", "--dry-run")
    folder = folder_of(project, "adapter")
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names
    assert "train_summary.json" not in names  # the pipeline's bookkeeping stays home
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "## Intended use and limitations" in card
    assert "AutoPeftModelForCausalLM" in card


def test_refuses_uncommitted_changes_and_stale_outputs(clone):
    project = clone("publish-refuse")
    (project.root / "notes.txt").write_text("not committed\n")
    dirty = project.python("-m", "tools.publish", REPO, "--dry-run", check=False)
    assert dirty.returncode == 1 and dirty.stderr.strip().splitlines() == [
        "error: the work tree has uncommitted changes (notes.txt); commit them first: what is published must "
        "be what a commit and its dvc.lock record"
    ]
    (project.root / "notes.txt").unlink()
    project.set_params({"train.beta": 0.3})
    project.commit("beta 0.3, not reproduced")
    stale = project.python("-m", "tools.publish", REPO, "--dry-run", check=False)
    assert stale.returncode == 1 and "dvc status says outputs are stale (" in stale.stderr
    assert "train" in stale.stderr and "Traceback" not in stale.stderr
    assert not folder_of(project).exists()
    bad = project.python("-m", "tools.publish", "not a repo id", "--dry-run", check=False)
    assert bad.returncode == 1 and "REPO: expected a hub repo id like org/name" in bad.stderr


def test_no_token_and_an_unreachable_hub_are_one_clear_line(clone):
    project = clone("publish-offline")
    env = {k: v for k, v in project.env.items() if k != "HF_TOKEN"}
    no_token = Project(project.root, env).python("-m", "tools.publish", REPO, check=False)
    assert no_token.returncode == 1 and "HF_TOKEN is not set" in no_token.stderr
    secret = "hf_testsecret0123456789"
    port = free_port()  # nothing listens there
    env = dict(env, HF_TOKEN=secret, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    result = Project(project.root, env).python("-m", "tools.publish", REPO, check=False)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not reach the model hub at http://127.0.0.1:{port}"), result.stderr
    assert "nothing was published" in last and "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr  # the token is never printed
    assert not (project.root / "metrics" / "publish.json").exists()
