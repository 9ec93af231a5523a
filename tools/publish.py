"""Publish the merged model (or the adapter) with its tokenizer and model card to the Hugging Face model hub.

    make publish REPO=org/name               # a private repo; the token from HF_TOKEN, never printed
    make publish REPO=org/name DRY_RUN=1     # writes the exact folder and card it would upload, says where
    make publish REPO=org/name ADAPTER=1     # the LoRA adapter alone (its card names the base)
    make publish REPO=org/name PUBLIC=1      # a public repo

What is published must be what dvc.lock records, so it refuses a work tree with uncommitted changes and
outputs that `dvc status` says are stale. After an upload it records the hub repo, its commit and URL in
metrics/publish.json and in an MLflow run (stage "publish"), and tags the merged model's MLflow logged model.
The folder is .scratch/publish/<org>--<name>/ (hard links to the DVC workspace files: no second copy).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from dpo_pipeline import lineage
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import sha256_tree
from dpo_pipeline.layout import ADAPTER_DIR, BASE_DIR, BASE_INFO, METRICS_DIR, PREPARED_DIR, SCRATCH_DIR
from dpo_pipeline.models.publish import KINDS, base_license, build_folder, card, dataset_ids, hub_license

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def require_reproducible() -> str:
    """The git commit, after checking that the work tree is clean and `dvc status` up to date."""
    status = _run("git", "status", "--porcelain")
    if status.returncode != 0:
        raise StageError(
            f"git status failed ({status.stderr.strip()}): publish runs in the project's git work tree"
        )
    if status.stdout.strip():
        changed = [line[3:] for line in status.stdout.splitlines()][:5]
        raise StageError(
            f"the work tree has uncommitted changes ({', '.join(changed)}); commit them first: what is "
            "published must be what a commit and its dvc.lock record"
        )
    dvc = _run(sys.executable, "-m", "dvc", "status", "--quiet")
    if dvc.returncode != 0:
        detail = _run(sys.executable, "-m", "dvc", "status").stdout
        stale = sorted(set(re.findall(r"^([\w@.-]+):\s*$", detail, re.M)))
        raise StageError(
            f"dvc status says outputs are stale ({', '.join(stale) or detail.strip()[:200]}); run `dvc repro` "
            "(or `dvc pull`) and commit dvc.lock first"
        )
    return _run("git", "rev-parse", "HEAD").stdout.strip()


def card_info(
    kind: str, params: Any, commit: str, license: str | None = None, language: str = "en"
) -> dict[str, Any]:
    from dpo_pipeline.io import read_json

    base_info = read_json(BASE_DIR / BASE_INFO) if (BASE_DIR / BASE_INFO).is_file() else {}
    source = KINDS[kind]
    raw = Path(params.data.path)
    prepared_meta: dict[str, str] = {}
    if (PREPARED_DIR / "train.parquet").is_file():
        import pyarrow.parquet as pq

        from dpo_pipeline.models.merge import data_metadata

        prepared_meta = data_metadata(pq.read_schema(PREPARED_DIR / "train.parquet").metadata)
    pairs = read_json(METRICS_DIR / "pairs.json") if (METRICS_DIR / "pairs.json").is_file() else {}
    card_md = METRICS_DIR / "eval_card.md"
    train = params.section("train")
    return {
        "base_name": params.base.name
        if params.base.source == "hub"
        else base_info.get("name", params.base.name),
        "datasets": dataset_ids(
            params.data, raw.with_name(raw.name + ".dvc") if params.data.source == "local" else None
        ),
        "license": license
        or base_license(BASE_DIR)
        or (hub_license(params.base.name, params.base.revision) if params.base.source == "hub" else None),
        "language": [language] if language else [],
        "base_source": params.base.source,
        "parameter_count": base_info.get("parameter_count", 0),
        "scores": read_json(METRICS_DIR / "eval.json") if (METRICS_DIR / "eval.json").is_file() else {},
        "versions": lineage.library_tags(),
        "dtype": params.merge.dtype,
        "git_commit": commit,
        "artifact_path": str(source),
        "artifact_md5": lineage.dvc_lock_md5(source) or "(not in dvc.lock)",
        "prepared_md5": lineage.dvc_lock_md5(PREPARED_DIR) or "",
        "raw_source": prepared_meta.get("raw_source", ""),
        "raw_data_hash": prepared_meta.get("raw_data_hash", ""),
        "pairs_trained": pairs.get("selected_train", ""),
        # The train run is named by the adapter's content hash (its MLflow tag), as the merge stage names it.
        "adapter_sha256": sha256_tree(ADAPTER_DIR) if ADAPTER_DIR.is_dir() else "",
        "train_params": {k: v for k, v in train.items() if k != "lora"}
        | {f"lora.{k}": v for k, v in train["lora"].items()},
        "evaluation": card_md.read_text(encoding="utf-8") if card_md.is_file() else None,
    }


def upload(folder: Path, repo_id: str, private: bool, message: str) -> dict[str, str]:
    """create_repo + upload_folder; every hub failure becomes one StageError (the token is never printed)."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise StageError(
            "HF_TOKEN is not set: publishing needs a hub token with write access in the environment"
        )
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    where = constants.ENDPOINT
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except OfflineModeIsEnabled:
        raise StageError("HF_HUB_OFFLINE is set: the model hub cannot be reached in offline mode") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "")
        raise StageError(
            f"the model hub at {where} refused the upload to {repo_id} (HTTP {status}: "
            f"{str(err).splitlines()[0][:200]}); check that HF_TOKEN has write access to it"
        ) from None
    except Exception as err:  # noqa: BLE001 - every other hub failure is one clear line too
        # Connection refused, DNS, timeouts: OSError, or the HTTP client's transport errors (httpx /
        # httpx2, whichever huggingface_hub uses), which do not derive from OSError.
        names = {cls.__name__ for cls in type(err).__mro__}
        if isinstance(err, OSError) or names & {
            "TransportError",
            "NetworkError",
            "ConnectError",
            "TimeoutException",
        }:
            raise StageError(
                f"could not reach the model hub at {where} ({type(err).__name__}); nothing was published"
            ) from None
        raise StageError(
            f"publishing to {repo_id} at {where} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "nothing was recorded"
        ) from None
    return {"repo": repo_id, "commit": info.oid, "url": info.commit_url, "private": str(private).lower()}


def require_repo_id(repo_id: str) -> None:
    """A hub repo id `org/name` as huggingface_hub itself validates it (no `..`, `--`, leading or trailing
    `.`/`-`): the id also names the dry run's folder, so `../..` must never reach a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = "" if REPO_ID.match(repo_id) else "not org/name"
    if not problem:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            problem = str(err).split(". ")[0]
    if problem:
        raise StageError(f"REPO: expected a hub repo id like org/name, got {repo_id!r} ({problem})")


def publish(
    repo_id: str,
    kind: str,
    dry_run: bool,
    private: bool,
    params_path: str = "params.yaml",
    license: str | None = None,
    language: str = "en",
) -> Path:
    from dpo_pipeline import config, tracking
    from dpo_pipeline.io import read_json, write_json

    require_repo_id(repo_id)
    params = config.load(params_path)
    commit = require_reproducible()
    folder = SCRATCH_DIR / "publish" / f"{repo_id.replace('/', '--')}-{kind}"
    build_folder(KINDS[kind], folder, card(kind, repo_id, card_info(kind, params, commit, license, language)))
    if dry_run:
        print(
            f"publish: dry run: {folder}/ holds exactly what would be uploaded to {repo_id} ({kind}, "
            f"{'private' if private else 'public'}); its model card is {folder}/README.md"
        )
        return folder
    with tracking.stage_run("publish", params, sections=[], inputs={kind: KINDS[kind]}):
        record = upload(folder, repo_id, private, f"dpo-pipeline {kind} from commit {commit}")
        record.update(kind=kind, git_commit=commit, artifact_md5=lineage.dvc_lock_md5(KINDS[kind]) or "")
        write_json(METRICS_DIR / "publish.json", record)
        tracking.set_tags({f"hub.{k}": v for k, v in record.items()})
        if kind == "merged":
            report_run = METRICS_DIR / "report_run.json"  # the report stage's MLflow model id
            model_id = read_json(report_run).get("mlflow_model_id", "") if report_run.is_file() else ""
            tracking.tag_logged_model(model_id, {f"hub.{k}": v for k, v in record.items()})
    print(
        f"publish: {repo_id} at hub commit {record['commit']} ({record['url']}); recorded in {METRICS_DIR / 'publish.json'}"
    )
    return folder


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default="", help="hub repo id, org/name")
    parser.add_argument(
        "--adapter", action="store_true", help="publish the LoRA adapter instead of the merged model"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the folder and card, upload nothing")
    parser.add_argument("--public", action="store_true", help="make the hub repo public (default: private)")
    parser.add_argument(
        "--license",
        default=None,
        help="the card's license (default: the base's, read from its card; else 'other')",
    )
    parser.add_argument("--language", default="en", help="the card's language code (default: en, the data's)")
    args = parser.parse_args()
    publish(
        args.repo,
        "adapter" if args.adapter else "merged",
        args.dry_run,
        not args.public,
        license=args.license,
        language=args.language,
    )


def main() -> None:
    from dpo_pipeline.runner import run_main

    run_main(_main)


if __name__ == "__main__":
    main()
