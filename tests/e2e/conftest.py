"""End-to-end fixtures: a tiny copy of this repo with its pipeline run once, clones of it, a real OpenSSH
server and a real MLflow tracking server, all on loopback and under temp dirs.

- `tiny_project` (session): the repo's tracked + untracked-not-ignored files (so uncommitted work is
  tested too), minus outputs, in a fresh git repo with a tiny params.yaml and a raw sample cut to
  RAW_ROWS rows; `dvc repro` runs once and the result is committed.
  Set DPO_E2E_PROJECT=<dir> to reuse the tiny project of an earlier session (<dir>/repo, <dir>/repro.log)
  while developing tests; CI never sets it.
- `clone` (factory): `git clone` of that repo plus a copy of its DVC cache and `dvc checkout`: a ready,
  up-to-date project in a second or two instead of a pipeline run. Each clone has its own cache copy, so
  a test may corrupt it.
- `sshd` (session): /usr/sbin/sshd -D on a free loopback port, throwaway host and user keys.
- `mlflow_server` (session server, restarted if a test stopped it): `mlflow server` with a SQLite backend.

Every subprocess gets `Project.env`: the venv's bin first on PATH (dvc.yaml's `python -m stages.X` must
be the venv's python), the hub offline, MLflow pointed at a per-project SQLite file outside the repo,
DVC's global/system/site dirs under tmp, unbuffered Python output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpo_pipeline.config import TRACE_ENV

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
RAW_ROWS = 200
RAW_PATH = "data/raw/orca_dpo_sample.jsonl"

# Never copied from the working tree into the test project: outputs and local state.
EXCLUDED_PREFIXES = (
    "models/",
    "data/prepared/",
    "data/tokenized/",
    "data/pairs/",
    "data/reference/",
    "metrics/",
    ".scratch/",
    ".mlflow/",
    "mlruns/",
    "mlartifacts/",
    "tests/",
    "bench/",
)
EXCLUDED_FILES = {"dvc.lock", "mlflow.db"}
# The stage outputs that are folders (DVC-cached), in pipeline order.
DIR_OUTS = (
    "models/base",
    "data/prepared",
    "data/tokenized",
    "data/reference",
    "models/adapter",
    "models/merged",
)

# The tiny profile: same schema as params.yaml, scaled so a full `dvc repro` takes well under 2 minutes.
TINY_PARAMS: dict[str, Any] = {
    "base.builtin.vocab_size": 512,
    "base.builtin.hidden_size": 32,
    "base.builtin.intermediate_size": 64,
    "base.builtin.num_hidden_layers": 2,
    "base.builtin.num_attention_heads": 4,
    "base.builtin.num_key_value_heads": 2,
    "base.builtin.max_position_embeddings": 512,
    "base.builtin.pretrain_steps": 8,
    "base.builtin.pretrain_batch_size": 8,
    "base.builtin.pretrain_max_length": 64,
    "data.max_prompt_length": 192,
    "data.max_length": 320,
    "train.max_steps": 6,
    "train.eval_steps": 3,  # the held-out curve: two points
    "train.warmup_steps": 1,
    "train.per_device_train_batch_size": 2,
    "train.save_steps": 2,
    "train.logging_steps": 1,
    "merge.fidelity_prompts": 4,
    "eval.limit": 8,
    "eval.batch_size": 4,
    "eval.max_new_tokens": 8,
    # 8 held-out documents are far too few to judge a model (the report marks such scores not meaningful and
    # registers nothing): the tiny project tests the mechanics, so its threshold is 4.
    "report.min_heldout_pairs": 4,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    if last not in node:
        raise KeyError(f"params key {dotted} does not exist (schema changed?)")
    node[last] = value


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


class Project:
    """A DVC project on disk and the environment its commands run in."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        result.seconds = time.monotonic() - started  # type: ignore[attr-defined]
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{' '.join(args)}` in {self.root} exited {result.returncode}\n"
                f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}"
            )
        return result

    def dvc(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(DVC, *args, **kwargs)

    def git(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run("git", *args, **kwargs)

    def python(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(sys.executable, *args, **kwargs)

    def popen(
        self, *args: str, env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen:
        """Start a command in its own process group (so a test can SIGKILL it and all its children)."""
        out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            list(args),
            cwd=self.root,
            env=env or self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, changes: dict[str, Any]) -> None:
        data = self.params()
        for key, value in changes.items():
            set_dotted(data, key, value)
        (self.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()

    @property
    def cache_dir(self) -> Path:
        return self.root / ".dvc" / "cache"


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def project_env(tmp: Path) -> dict[str, str]:
    """The environment of every e2e subprocess (see the module docstring)."""
    dvc_config = tmp / "dvc-global"
    dvc_config.mkdir(parents=True, exist_ok=True)
    (dvc_config / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="true",
        DVC_GLOBAL_CONFIG_DIR=str(dvc_config),
        DVC_SYSTEM_CONFIG_DIR=str(dvc_config / "system"),
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        GIT_AUTHOR_NAME="e2e",
        GIT_AUTHOR_EMAIL="e2e@example.com",
        GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@example.com",
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(tmp / "home"),
    )
    (tmp / "home").mkdir(exist_ok=True)
    env.pop("PYTHONPATH", None)
    env.pop("DVC_ROOT", None)
    return env


def source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree, minus outputs."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for rel in sorted(set(filter(None, listing.split("\0")))):
        if rel in EXCLUDED_FILES or rel.startswith(EXCLUDED_PREFIXES) or "__pycache__" in rel:
            continue
        if (REPO / rel).is_file():  # --cached lists files deleted from the work tree too
            files.append(rel)
    return files


def make_tiny_project(root: Path) -> None:
    root.mkdir(parents=True)
    for rel in source_files():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    lines = (REPO / RAW_PATH).read_text(encoding="utf-8").splitlines(keepends=True)
    (root / RAW_PATH).write_text("".join(lines[:RAW_ROWS]), encoding="utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in TINY_PARAMS.items():
        set_dotted(params, key, value)
    (root / "params.yaml").write_text(
        "# tiny e2e profile (tests/e2e/conftest.py TINY_PARAMS over the repo's params.yaml)\n"
        + yaml.safe_dump(params, sort_keys=False)
    )


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Iterator[Project]:
    """The tiny project after one full `dvc repro`, committed. Read-only for tests: clone it to change it."""
    reuse = os.environ.get("DPO_E2E_PROJECT")
    if reuse:  # developer shortcut: a tiny project built by an earlier session (its parent dir), read-only
        project = Project(Path(reuse) / "repo", project_env(Path(reuse)))
        project.repro_seconds = 0.0  # type: ignore[attr-defined]
        project.repro_output = (Path(reuse) / "repro.log").read_text()  # type: ignore[attr-defined]
        project.params_trace = Path(reuse) / "params-trace"  # type: ignore[attr-defined]
        yield project
        return
    tmp = tmp_path_factory.mktemp("tiny")
    project = Project(tmp / "repo", project_env(tmp))
    make_tiny_project(project.root)
    project.git("init", "-q", "-b", "main")
    if (project.root / (RAW_PATH + ".dvc")).exists():
        project.dvc("add", "-q", RAW_PATH)  # the raw sample was cut: re-record it
    project.commit("tiny e2e project")
    # Every stage process of this repro records the params keys it reads (tests/e2e/test_dag_params.py).
    project.params_trace = tmp / "params-trace"  # type: ignore[attr-defined]
    project.env[TRACE_ENV] = str(project.params_trace)
    try:
        result = project.dvc("repro", timeout=900)
    finally:
        del project.env[TRACE_ENV]
    project.repro_seconds = result.seconds  # type: ignore[attr-defined]
    project.repro_output = result.stdout  # type: ignore[attr-defined]
    (tmp / "repro.log").write_text(result.stdout)
    print(f"\n[e2e] session dvc repro of the tiny project: {result.seconds:.1f} s", file=sys.stderr)
    project.commit("dvc repro")
    yield project


@pytest.fixture
def clone(tiny_project, tmp_path) -> Callable[..., Project]:
    """clone(name, source=tiny_project, checkout=True, cache=True, branch=None) -> Project.

    A `git clone` of `source` at tmp/work/<name>; with `cache`, a private copy of the source's DVC cache
    (so a test may corrupt it); with `checkout`, `dvc checkout` fills the workspace. All clones of one test
    are siblings, so they share the default remote ../dpo-pipeline-storage as clones on one machine do.
    """

    def make(
        name: str,
        source: Project | None = None,
        checkout: bool = True,
        cache: bool = True,
        branch: str | None = None,
    ) -> Project:
        source = source or tiny_project
        env_dir = tmp_path / f"{name}-env"
        env_dir.mkdir()
        project = Project(tmp_path / "work" / name, project_env(env_dir))
        project.root.parent.mkdir(exist_ok=True)
        args = ["git", "clone", "-q"] + (["-b", branch] if branch else [])
        subprocess.run(
            [*args, str(source.root), str(project.root)], check=True, env=project.env, capture_output=True
        )
        if cache:
            shutil.copytree(source.cache_dir, project.cache_dir, symlinks=True)
        if checkout:
            project.dvc("checkout", "-q")
        return project

    return make


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A real OpenSSH server on 127.0.0.1:<free port>; yields host, port, user, keyfile, tmp."""
    sshd_bin = Path("/usr/sbin/sshd")
    sftp = Path("/usr/lib/openssh/sftp-server")
    if not sshd_bin.exists() or not sftp.exists():
        pytest.fail(
            f"{sshd_bin} or {sftp} is missing: install Debian's openssh-server (`make system-deps`, which .ci/run "
            "and `make test` call) to run the SSH remote tests"
        )
    tmp = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {tmp / 'host_key'}\n"
        f"PidFile {tmp / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PermitRootLogin yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        f"Subsystem sftp {sftp}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation dir sshd insists on
    log = open(tmp / "sshd.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(sshd_bin), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-2.0"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.flush()
            pytest.fail(f"sshd did not start on port {port}:\n{(tmp / 'sshd.log').read_text()}")
        time.sleep(0.1)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    yield {"host": "127.0.0.1", "port": port, "user": user, "keyfile": str(tmp / "user_key"), "tmp": tmp}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


class MlflowServer:
    """`mlflow server` on loopback with a SQLite backend; stop() / start() keep the same database."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = tmp / "server.db"
        self.artifacts = tmp / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.env = project_env(tmp)
        self.env.pop("MLFLOW_TRACKING_URI")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.healthy():
            return
        self.artifacts.mkdir(exist_ok=True)
        log = open(self.tmp / "server.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--artifacts-destination",
                str(self.artifacts),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                self.stop()
                pytest.fail(f"mlflow server did not come up:\n{_tail((self.tmp / 'server.log').read_text())}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:  # workers go down with the group
            time.sleep(0.2)


@pytest.fixture(scope="session")
def _mlflow_server_session(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_mlflow_server_session) -> MlflowServer:
    """The session's MLflow server, (re)started if an earlier test stopped it."""
    _mlflow_server_session.start()
    return _mlflow_server_session
