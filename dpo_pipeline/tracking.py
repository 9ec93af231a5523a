"""MLflow tracking: the one place that opens runs and writes lineage tags.

Every stage wraps its work in `stage_run(...)`. A run gets:
- params: the params sections the stage declares in dvc.yaml, flattened (`train.lora.r`); values longer
  than MLflow's limit are truncated and the full sections are logged as the artifact `params.json`;
- tags: stage, git commit / branch / dirty flag, host and pid, library versions, and for every input the
  DVC md5 recorded in dvc.lock (`input.<name>.md5`) plus our own sha256 (`input.<name>.sha256`); outputs get
  `output.<name>.sha256`, so runs chain: a merge run's `input.adapter.sha256` equals the train run's
  `output.adapter.sha256`.

Store: MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` at the repo root (gitignored).
Faults:
- An unreachable server is detected before any work starts. `tracking.on_unreachable` in params.yaml
  says what happens: `fail` (default: stop with a clear message) or `local` (warn, use ./mlflow.db).
  The tracking section is deliberately not a DVC param of any stage: it changes where results are
  recorded, never what a stage produces, so switching it must not re-run the pipeline.
- A tracking error after the run started (server died mid-training) never fails the stage: the error
  is reported once on stderr, further logging is skipped, and the stage's outputs are still published.
- With several processes (torchrun / accelerate launch set RANK), only rank 0 records: on other ranks
  `stage_run` yields None and the logging functions do nothing.
- SIGTERM / Ctrl-C end the run KILLED; an exception ends it FAILED. A run killed with SIGKILL cannot
  close itself: the next run of the same stage marks RUNNING runs whose process is gone as KILLED.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import flatten, sha256_tree

LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "lm_eval",
    "dvc",
    "mlflow",
)
MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3

# Fail fast instead of retrying for minutes against a dead server (MLflow's defaults: 7 retries, 120 s).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

_state: dict[str, Any] = {"broken": False}


class StageKilled(SystemExit):
    """Raised from the SIGTERM handler so the run can be closed as KILLED on the way out."""


def is_secondary_rank() -> bool:
    """True in a worker of a multi-process launch other than rank 0: it leaves all tracking to rank 0."""
    return int(os.environ.get("RANK", "0")) != 0


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(on_unreachable: str) -> str:
    """The tracking URI to use, after checking that a server URI answers."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            if response.status == 200:
                return uri
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    if on_unreachable == "local":
        print(
            f"warning: MLflow tracking server {uri} is unreachable ({problem}); "
            f"recording this run in the local store {default_uri()} instead (tracking.on_unreachable: local)",
            file=sys.stderr,
        )
        return default_uri()
    raise StageError(
        f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable ({problem}); nothing was run. "
        "Start it (make mlflow-server), unset MLFLOW_TRACKING_URI to use ./mlflow.db, or set "
        "tracking.on_unreachable: local in params.yaml to fall back to the local store."
    )


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    branch = _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown"
    # Untracked outputs are ignored by .gitignore/dvc; any tracked change (params, code) makes it dirty.
    # dvc.lock and the git-tracked metrics/ are written (or first removed) by `dvc repro` itself: not dirt.
    dirty = _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock", ":(exclude)metrics"
    )
    return {
        "git.commit": commit,
        "git.branch": branch,
        "git.dirty": str(bool(dirty)).lower(),
        "mlflow.source.git.commit": commit,
    }


def library_tags() -> dict[str, str]:
    tags = {"version.python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            tags[f"version.{name}"] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            tags[f"version.{name}"] = "not-installed"
    return tags


def dvc_lock_md5(path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for `path` as an output of any stage in dvc.lock (None if absent)."""
    import yaml

    lock_file = Path(lock_file)
    if not lock_file.exists():
        return None
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    wanted = Path(path).as_posix().rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if Path(entry.get("path", "")).as_posix().rstrip("/") == wanted and entry.get("md5"):
                return entry["md5"]
    return None


def params_for(params: Any, sections: list[str]) -> dict[str, Any]:
    """The declared params (dotted names as in dvc.yaml) as a nested dict of plain data."""
    import dataclasses

    from dpo_pipeline.config import plain as untraced

    plain = dataclasses.asdict(untraced(params))
    picked: dict[str, Any] = {}
    for dotted in sections:
        value: Any = plain
        for part in dotted.split("."):
            value = value[part]
        picked[dotted] = value
    return picked


def _truncate(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _guarded(fn, *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow function; after the first failure, report once and skip further logging."""
    if _state["broken"]:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any tracking failure must not cost the stage's work
        _state["broken"] = True
        print(
            f"warning: MLflow tracking failed ({type(err).__name__}: {err}); the stage goes on and its "
            "outputs are still written, but the rest of this run is not recorded in MLflow",
            file=sys.stderr,
        )
        return None


def _set_experiment(mlflow: Any, name: str, attempts: int = 3) -> Any:
    """set_experiment, retried: two stages creating a fresh SQLite store at once (dvc queue -j 2) race in
    MLflow's schema migration, and the loser succeeds once the winner has finished it."""
    import time

    for attempt in range(attempts):
        try:
            return mlflow.set_experiment(name)
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            time.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_stale_runs(client: Any, experiment_id: str, stage: str) -> list[str]:
    """Mark RUNNING runs of this stage on this host whose process is gone as KILLED."""
    host = socket.gethostname()
    closed = []
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("pid", "0") or 0)
        if tags.get("host") == host and pid and pid != os.getpid() and not _pid_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "killed_reason", "process gone (found by a later run)")
            closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Any,
    sections: list[str],
    inputs: dict[str, str | Path] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Open an MLflow run for one stage with params and lineage tags; close it with the right status."""
    if is_secondary_rank():
        yield None
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    _state["broken"] = False
    uri = resolve_uri(params.tracking.on_unreachable)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = _set_experiment(mlflow, params.tracking.experiment)
        client = MlflowClient(uri)
        close_stale_runs(client, experiment.experiment_id, stage)
    except Exception as err:  # noqa: BLE001
        if params.tracking.on_unreachable == "local" and uri != default_uri():
            print(f"warning: MLflow at {uri} failed ({err}); using {default_uri()}", file=sys.stderr)
            uri = default_uri()
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(params.tracking.experiment)
        else:
            raise StageError(f"MLflow tracking store {uri} failed before the stage started: {err}") from err

    git = git_tags()
    run_tags = {
        "stage": stage,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "tracking_uri_kind": uri.split(":", 1)[0],
        **git,
        **library_tags(),
        **(tags or {}),
    }
    for name, path in (inputs or {}).items():
        run_tags[f"input.{name}.path"] = str(path)
        run_tags[f"input.{name}.md5"] = dvc_lock_md5(path) or "not-in-dvc.lock"
        run_tags[f"input.{name}.sha256"] = sha256_tree(path) if Path(path).exists() else "missing"

    declared = params_for(params, sections)
    flat = {k: _truncate(v) for k, v in flatten(declared).items()}

    run = mlflow.start_run(run_name=f"{stage}@{git['git.commit'][:8]}", tags=run_tags)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise StageKilled(128 + signal.SIGTERM)

    in_main_thread = _in_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    status = "FINISHED"
    try:
        _guarded(mlflow.log_params, flat)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "params.json"
            path.write_text(json.dumps(declared, indent=2, sort_keys=True))
            _guarded(mlflow.log_artifact, str(path))
        yield run
    except (StageKilled, KeyboardInterrupt):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        # end_run must happen even if logging broke, or the run stays RUNNING.
        try:
            mlflow.end_run(status=status)
        except Exception as err:  # noqa: BLE001
            print(f"warning: could not close MLflow run {run.info.run_id}: {err}", file=sys.stderr)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if is_secondary_rank():
        return
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    _guarded(mlflow.log_metrics, clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    if is_secondary_rank():
        return
    import mlflow

    _guarded(mlflow.set_tags, {k: str(v) for k, v in tags.items()})


def log_outputs(outputs: dict[str, str | Path]) -> None:
    if is_secondary_rank():
        return
    set_tags({f"output.{name}.sha256": sha256_tree(path) for name, path in outputs.items()})


def log_artifact(path: str | Path) -> None:
    if is_secondary_rank():
        return
    import mlflow

    _guarded(mlflow.log_artifact, str(path))


def mlflow_callback():
    """transformers' MLflowCallback, made unable to fail training: it logs into the stage's active run
    and, after a tracking error, stops logging instead of raising out of the training loop."""
    from transformers.integrations import MLflowCallback

    class SafeMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            _guarded(super().setup, args, state, model)
            self._initialized = True

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not _state["broken"]:
                _guarded(super().on_log, args, state, control, logs=logs, model=model, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            _guarded(super().on_train_end, args, state, control, **kwargs)

        def on_save(self, args, state, control, **kwargs):
            _guarded(super().on_save, args, state, control, **kwargs)

    return SafeMLflowCallback()
