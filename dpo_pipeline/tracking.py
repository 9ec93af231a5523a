"""MLflow tracking: the one place that opens runs and writes lineage tags.

Every stage wraps its work in `stage_run(...)`. A run gets:
- params: the params sections the stage declares in dvc.yaml, flattened (`train.lora.r`); values longer
  than MLflow's limit are truncated and the full sections are logged as the artifact `params.json`;
- tags: stage, git commit / branch / dirty flag, host and pid, library versions, and for every input its
  path and `input.<name>.hash` (see lineage_hash: DVC's md5 from dvc.lock under `dvc repro`, where the
  producing stage has just recorded it, so nothing DVC hashed is read again; our own sha256 only for a path
  DVC has not recorded). Runs chain through dvc.lock: a merge run's `input.adapter.hash` is the md5 that the
  train stage's entry in dvc.lock (at the run's commit) gives models/adapter.

Store: MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` at the repo root (gitignored).
Faults:
- An unreachable server is detected before any work starts. `tracking.on_unreachable` in params.yaml
  says what happens: `fail` (default: stop with a clear message) or `local` (warn, use ./mlflow.db).
  The tracking section is deliberately not a DVC param of any stage: it changes where results are
  recorded, never what a stage produces, so switching it must not re-run the pipeline.
- A tracking error after the run started (server died mid-training) never fails the stage: the error
  is reported once on stderr, further logging is skipped, and the stage's outputs are still published;
  the run then ends FAILED with tags `tracking.incomplete: true` and `tracking.error` (a partial record must
  not pass for a complete one).
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
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.errors import StageError
from dpo_pipeline.io import flatten
from dpo_pipeline.lineage import (
    experiment_tags,
    git_tags,
    library_tags,
    lineage_hash,
    params_fingerprint,
    params_for,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3

# Fail fast instead of retrying for minutes against a dead server (MLflow's defaults: 7 retries, 120 s). Set by
# _client_defaults() when a stage first talks to MLflow, not at import (the library has no import side effects).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

_state: dict[str, Any] = {"broken": False, "error": ""}


class StageKilled(SystemExit):
    """Raised from the SIGTERM handler so the run can be closed as KILLED on the way out."""


def is_secondary_rank() -> bool:
    """True in a worker of a multi-process launch other than rank 0: it leaves all tracking to rank 0."""
    return int(os.environ.get("RANK", "0")) != 0


def _client_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def store_uri() -> str:
    """MLFLOW_TRACKING_URI, else the default local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """Open a local store once, fast, before MLflow does (its engine retries a store it cannot create for
    minutes): one StageError naming the URI and the cause. An in-memory SQLite store is refused, since every
    run recorded there is lost when the stage ends. Server URIs are checked by resolve_uri."""
    import sqlite3

    if not uri.startswith("sqlite:"):
        return
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking store"
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:" or "mode=memory" in uri:
        raise StageError(
            f"{where} {uri!r} is an in-memory SQLite store: every run would be lost when the stage ends; "
            "expected sqlite:///<path to a file> (or unset it for ./mlflow.db)"
        )
    file = Path(path)
    if not file.parent.is_dir():
        raise StageError(f"{where} {uri!r}: folder {file.parent} does not exist; nothing was run")
    try:
        connection = sqlite3.connect(file, timeout=5)
        try:
            connection.execute("PRAGMA user_version").fetchone()
            if not file.exists() or not os.access(file, os.W_OK):
                raise sqlite3.OperationalError("not writable")
        finally:
            connection.close()
    except sqlite3.Error as err:
        raise StageError(
            f"{where} {uri!r}: the SQLite store {file} cannot be opened or created ({err}); nothing was run. "
            "Point MLFLOW_TRACKING_URI at a writable file, or unset it for ./mlflow.db"
        ) from None


def resolve_uri(on_unreachable: str) -> str:
    """The tracking URI to use, after checking that a local store opens (check_store) or a server answers."""
    _client_defaults()
    uri = store_uri()
    if not uri.startswith(("http://", "https://")):
        check_store(uri)
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
        _state["error"] = f"{type(err).__name__}: {err}"[:500]
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


def prepare_store(params: Params) -> None:
    """Check the tracking server and create the store and experiment once, before `train.num_processes`
    workers start (dpo_pipeline.train.launch).

    An unreachable server then stops the stage before N processes load models. And rank 0 does not run MLflow's
    database migrations while a worker that failed on bad input gets it stopped (torchrun stops the remaining
    workers when one fails), which could leave a half-migrated SQLite store behind. A tracking error here is
    not fatal: rank 0's stage_run tries again, and fails or falls back as `tracking.on_unreachable` says.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(params.tracking.on_unreachable)
    try:
        mlflow.set_tracking_uri(uri)
        _set_experiment(mlflow, params.tracking.experiment, attempts=1)
    except (MlflowException, OSError) as err:
        print(
            f"warning: preparing the MLflow store {uri} before launching the workers failed "
            f"({type(err).__name__}: {err}); rank 0 tries again when it opens its run",
            file=sys.stderr,
        )


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs. A zombie does not: a SIGKILLed stage whose parent (dvc) was killed
    too stays a zombie until something reaps it, and in a container whose PID 1 reaps nothing that is forever;
    signal 0 alone would call it alive and its run would never be closed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): signal 0 is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the state field, after "(comm)"


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
    params: Params,
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
    _state["error"] = ""
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
    experiment_run = experiment_tags()
    declared = params_for(params, sections)
    run_tags = {
        "stage": stage,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "tracking_uri_kind": uri.split(":", 1)[0],
        **git,
        **experiment_run,
        "params.fingerprint": params_fingerprint(declared),
        **library_tags(),
        **(tags or {}),
    }
    for name, path in (inputs or {}).items():
        run_tags[f"input.{name}.path"] = str(path)
        run_tags[f"input.{name}.hash"] = lineage_hash(path)

    flat = {k: _truncate(v) for k, v in flatten(declared).items()}

    # An experiment's runs are named after it: its baseline commit's params are not the ones it ran with.
    label = experiment_run.get("dvc.exp.name") or git["git.commit"][:8]
    # CPU, memory, disk and network over time (psutil; GPUs too where pynvml is installed): a stalled or
    # memory-bound node shows in the run's system/* metrics.
    mlflow.set_system_metrics_sampling_interval(params.tracking.system_metrics_interval_s)
    run = mlflow.start_run(
        run_name=f"{stage}@{label}", tags=run_tags, log_system_metrics=params.tracking.system_metrics
    )
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
        # end_run must happen even if logging broke, or the run stays RUNNING. A run whose logging broke
        # holds only part of what the stage did: it must not pass for a complete record (FINISHED, which
        # tools.compare and searches pick up), so it ends FAILED with the reason, the stage's work intact.
        if _state["broken"] and status == "FINISHED":
            status = "FAILED"
            with contextlib.suppress(Exception):
                mlflow.set_tags({"tracking.incomplete": "true", "tracking.error": _state["error"]})
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
    """Name the outputs (paths only: DVC hashes them right after the stage, into dvc.lock, and the next
    stage's `input.<name>.hash` carries that md5)."""
    if is_secondary_rank():
        return
    set_tags({f"output.{name}.path": str(path) for name, path in outputs.items()})


def log_artifact(path: str | Path) -> None:
    if is_secondary_rank():
        return
    import mlflow

    _guarded(mlflow.log_artifact, str(path))


def registration(policy: str, git: dict[str, str], experiment: dict[str, str]) -> tuple[bool, str]:
    """(register a model version?, where the run came from) under tracking.register: `clean` registers only a
    `dvc repro` of a clean, committed work tree, never a `dvc exp run` (its baseline commit's params are not the
    ones it ran with) nor uncommitted changes; `always` registers every run (tagged with where it came from);
    `never` none."""
    if experiment.get("dvc.exp.name"):
        source = (
            f"experiment {experiment['dvc.exp.name']} (baseline {experiment.get('dvc.exp.baseline', '')[:8]})"
        )
    elif git.get("git.dirty") != "false":
        source = "uncommitted work tree"
    else:
        source = "clean commit"
    return policy == "always" or (policy == "clean" and source == "clean commit"), source


def log_model(
    name: str,
    adapter_hash: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    model_type: str,
    register: bool = True,
) -> str:
    """The merged model as an MLflow 3 logged model (external: its weights stay in DVC, the model points at
    them by path, md5 and commit), linked to the merge run that made it (its source run: the latest finished
    merge run of this adapter), carrying `metrics` and, with `register`, registered as a version of `name` in
    the registry. Called inside the report stage's run; returns the model id ("" when tracking is off or
    failed)."""
    if is_secondary_rank():
        return ""
    import mlflow

    def go() -> str:
        client = mlflow.MlflowClient()
        run = mlflow.active_run()
        experiment = run.info.experiment_id
        merges = client.search_runs(
            [experiment],
            filter_string=f"tags.stage = 'merge' and tags.`lineage.adapter.hash` = '{adapter_hash}' "
            "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        source = merges[0].info.run_id if merges else ""
        model = mlflow.create_external_model(
            name=name,
            source_run_id=source or run.info.run_id,
            tags={
                **{k: str(v) for k, v in tags.items()},
                "lineage.merge_run_id": source,
                "lineage.report_run_id": run.info.run_id,
            },
            model_type=model_type,
            experiment_id=experiment,
        )
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=model.model_id)
        if not register:
            mlflow.set_tags({"model.id": model.model_id, "model.registered": "no"})
            return model.model_id
        version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
        mlflow.set_tags({"model.id": model.model_id, "model.registered": f"{name}/{version.version}"})
        return model.model_id

    return _guarded(go) or ""


# The train run tags its adapter with this content hash (our sha256 of the folder, small next to the model); merge,
# evaluate and report find the train run by it (train_run_of), instead of a run id written into their inputs.
ADAPTER_SHA256_TAG = "output.adapter.sha256"


def find_run(stage: str, tags: dict[str, str]) -> str:
    """The id of the latest FINISHED run of `stage` in the active run's experiment whose tags equal `tags`, or ""
    (tracking off or broken, no such run). Lineage between runs is looked up here, at run time, so no run id
    is ever written into an output that a later stage hashes: a re-run that makes the same bytes re-runs
    nothing downstream."""
    if is_secondary_rank() or not all(tags.values()):
        return ""
    import mlflow

    def go() -> str:
        run = mlflow.active_run()
        if run is None:
            return ""
        conditions = [f"tags.stage = '{stage}'", "attributes.status = 'FINISHED'"]
        conditions += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        found = mlflow.MlflowClient().search_runs(
            [run.info.experiment_id],
            filter_string=" and ".join(conditions),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0].info.run_id if found else ""

    return _guarded(go) or ""


def train_run_of(adapter_sha256: str) -> str:
    """The latest finished train run that wrote an adapter with this content hash ("" when none is recorded)."""
    return find_run("train", {ADAPTER_SHA256_TAG: adapter_sha256})


def tag_logged_model(model_id: str, tags: dict[str, Any]) -> None:
    """Add tags to a logged model (publish: where it went on the hub)."""
    if is_secondary_rank() or not model_id:
        return
    import mlflow

    _guarded(
        lambda: mlflow.MlflowClient().set_logged_model_tags(model_id, {k: str(v) for k, v in tags.items()})
    )
