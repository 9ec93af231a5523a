"""Several processes, GPUs or nodes: torchrun on CPU (gloo), accelerate on GPUs; this module only builds
their command lines from params and the environment the engines set, and waits for them.

One node, several processes (`train.num_processes` > 1): `python -m stages.train` re-launches itself as that many
workers and exits with their exit code (see `launch_command`). On the CPU (`train.device: cpu`) the launcher
is torchrun (`python -m torch.distributed.run`, gloo backend; `accelerate launch --cpu` starts one plain process
per machine, no process group); on CUDA it is `accelerate launch` (DDP, one GPU per process, `--mixed_precision`
from `train.precision`). Each worker takes its own micro-batches of per_device_train_batch_size pairs, so the
global batch is per_device_train_batch_size * num_processes * num_nodes * gradient_accumulation_steps (the pairs
stage selects that many pairs per step). Only global rank 0 opens the MLflow run and writes models/adapter, the
metrics and the history; throughput counts are summed over the processes. DDP takes the 4-bit base and the LoRA
layers as they are: only the LoRA weights require gradients and get synchronized, and the ranks end with identical
adapters.

Several nodes (`train.num_nodes` > 1): node 0 runs `dvc repro` as usual; every other node runs
`make train-worker` (tools/train_worker.py: `dvc repro --pull` of the stages that write train's inputs, then
`python -m stages.train --worker`). Each node learns its rank and node 0's address from the environment its engine set (`placement`):
torchrun's names (NODE_RANK, MASTER_ADDR, MASTER_PORT), Slurm's (SLURM_NODEID, SLURM_NNODES, the first host of
SLURM_JOB_NODELIST) or SkyPilot's (SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES), and passes them to
torchrun / accelerate launch as --nnodes/--node_rank/--master_addr/--master_port. The rendezvous is torchrun's
static one: it keeps node 0's first process as global rank 0, the one that publishes (torch 2.13's c10d
rendezvous numbers the nodes by host name, so the publisher could land on a worker node that runs no `dvc repro`).
`launch.max_restarts` is passed on as --max_restarts: a failed worker group restarts and resumes from the last
checkpoint in `launch.checkpoint_dir` (docs/scaling.md says what that covers on one node and on several). A
restarted worker joins its group through `join_restarted_group` (torch 2.13 reuses the agent's store across
restarts without a per-attempt key prefix).

Sharded QLoRA (`train.distributed: fsdp | zero3`, GPUs only): accelerate launch with the shipped config file
(configs/accelerate/fsdp2_qlora.yaml or zero3_qlora.yaml, after peft's FSDP+QLoRA and DeepSpeed+QLoRA guides);
the 4-bit weights are stored in the compute dtype (loading.bnb_config) so that they can be sharded, and the
adapter is gathered whole before it is saved (dpo.adapter_state). With `train.distributed: ddp`,
ACCELERATE_CONFIG_FILE still points accelerate at any config file of your own (it is refused together with fsdp or
zero3: two files would pick the distribution). The file changes how the work is spread, not what is computed, so
it is not a DVC param.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dpo_pipeline.errors import StageError
from dpo_pipeline.models.loading import (
    resolve_device,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> accelerate's flag
# train.distributed -> the accelerate config file the stage launches with (None: DDP from the command line)
ACCELERATE_CONFIGS = {
    "ddp": None,
    "fsdp": Path("configs/accelerate/fsdp2_qlora.yaml"),
    "zero3": Path("configs/accelerate/zero3_qlora.yaml"),
}
LOOPBACK = "127.0.0.1"


def is_distributed_worker(env: Mapping[str, str]) -> bool:
    """True inside a process started by torchrun / accelerate launch (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


@dataclass(frozen=True)
class Placement:
    """Where this node stands: its rank among `nodes`, node 0's address and rendezvous port, and who said so."""

    rank: int
    nodes: int
    master_addr: str
    master_port: int
    source: str


def this_machine() -> Placement:
    """One node: rank 0 of 1, the rendezvous on a loopback port that is free now."""
    return Placement(0, 1, LOOPBACK, free_port(), "one node")


def world_size(params: Params) -> int:
    """Training processes in all: train.num_processes on each of train.num_nodes."""
    return params.train.num_processes * params.train.num_nodes


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`gpu[03-05,9],cpu1` -> `gpu03`), as `scontrol show hostnames`
    would list it first."""
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise StageError(
            f"SLURM_JOB_NODELIST: expected a Slurm node list such as gpu[01-04], got {nodelist!r}"
        )
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise StageError(f"{name}: expected an integer, got {env[name]!r}") from None


def placement(env: Mapping[str, str], num_nodes: int, default_port: int) -> Placement:
    """This node's rank, the node count and node 0's address from the launching engine's environment.

    One node: this_machine(). Several: torchrun's names first (NODE_RANK and MASTER_ADDR, as a user or a
    wrapper sets them), then SkyPilot's, then Slurm's. MASTER_PORT, when set, overrides `launch.master_port`.
    The engine's node count must equal `train.num_nodes` (the pairs stage selected pairs for that many)."""
    if num_nodes == 1:
        return this_machine()
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default_port
    if "NODE_RANK" in env and "MASTER_ADDR" in env:
        found = Placement(
            _int(env, "NODE_RANK"), num_nodes, env["MASTER_ADDR"], port, "NODE_RANK/MASTER_ADDR"
        )
        if "NNODES" in env:
            found = Placement(found.rank, _int(env, "NNODES"), found.master_addr, port, found.source)
    elif "SKYPILOT_NODE_RANK" in env:
        ips = env.get("SKYPILOT_NODE_IPS", "").split()
        if not ips:
            raise StageError("SKYPILOT_NODE_IPS: expected the nodes' addresses, one per line, got nothing")
        nodes = _int(env, "SKYPILOT_NUM_NODES") if "SKYPILOT_NUM_NODES" in env else len(ips)
        found = Placement(_int(env, "SKYPILOT_NODE_RANK"), nodes, ips[0], port, "SkyPilot")
    elif "SLURM_NODEID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        found = Placement(
            _int(env, "SLURM_NODEID"), _int(env, "SLURM_NNODES"), first_slurm_host(nodelist), port, "Slurm"
        )
    else:
        raise StageError(
            f"train.num_nodes is {num_nodes} but the environment names no node rank and master address: set "
            "NODE_RANK and MASTER_ADDR (torchrun's names; MASTER_PORT optional), or run under Slurm or SkyPilot "
            "(docs/scaling.md)"
        )
    if found.nodes != num_nodes:
        raise StageError(
            f"train.num_nodes is {num_nodes} but {found.source} says this job has {found.nodes} nodes: "
            "set train.num_nodes to the job's node count (the pairs stage selects pairs for it)"
        )
    if not 0 <= found.rank < num_nodes:
        raise StageError(f"{found.source}: node rank {found.rank} outside 0..{num_nodes - 1}")
    return found


def needs_launcher(params: Params) -> bool:
    """Whether the train stage runs through torchrun / accelerate launch (several processes or nodes, or a
    sharded strategy, which accelerate sets up even for one process)."""
    return world_size(params) > 1 or params.train.distributed != "ddp"


def accelerate_config(params: Params, env: Mapping[str, str], root: str | Path = ".") -> str | None:
    """The accelerate config file for train.distributed (fsdp, zero3: the shipped file), or the user's
    ACCELERATE_CONFIG_FILE with ddp; None = DDP from the command line."""
    chosen = ACCELERATE_CONFIGS[params.train.distributed]
    own = env.get("ACCELERATE_CONFIG_FILE") or None
    if chosen is None:
        return own
    if own:
        raise StageError(
            f"ACCELERATE_CONFIG_FILE is set ({own}) and train.distributed is {params.train.distributed}, which "
            f"launches with {chosen}: unset one of the two"
        )
    return str(Path(root) / chosen)


def launch_command(
    params: Params,
    where: Placement,
    config_file: str | None = None,
    python: str = sys.executable,
    module: str = "stages.train",
    processes: int | None = None,
    max_restarts: int | None = None,
) -> list[str]:
    """argv that runs `module` as `processes` (default train.num_processes) workers on this node, one node of
    `where.nodes`.

    CPU: torchrun (gloo). CUDA: accelerate launch, DDP unless `config_file` (an accelerate config file,
    e.g. FSDP or DeepSpeed) says otherwise. Static rendezvous at where.master_addr:where.master_port."""
    t = params.train
    per_node = processes or t.num_processes
    restarts = str(params.launch.max_restarts if max_restarts is None else max_restarts)
    if resolve_device(t.device) == "cpu":
        return [
            python, "-m", "torch.distributed.run",
            "--nnodes", str(where.nodes), "--nproc_per_node", str(per_node), "--node_rank", str(where.rank),
            "--master_addr", where.master_addr, "--master_port", str(where.master_port),
            "--max_restarts", restarts,
            "-m", module,
        ]  # fmt: skip
    distribution = (
        ["--config_file", config_file] if config_file else ["--multi_gpu", "--dynamo_backend", "no"]
    )
    return [
        python, "-m", "accelerate.commands.launch",
        *distribution,
        "--num_machines", str(where.nodes), "--machine_rank", str(where.rank),
        "--num_processes", str(per_node * where.nodes),
        "--mixed_precision", MIXED_PRECISION[t.precision],
        "--main_process_ip", where.master_addr, "--main_process_port", str(where.master_port),
        "--rdzv_backend", "static", "--same_network", "--max_restarts", restarts,
        "-m", module,
    ]  # fmt: skip


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """From now on this process gets `sig` when its parent dies (Linux prctl PR_SET_PDEATHSIG; a no-op
    elsewhere), and dies at once if the parent is already gone.

    torchrun's elastic agent starts every worker in a session of its own, so a `kill -9` of the process group
    that ran `dvc repro` (a CI cancel, a closed terminal) left the workers training with nobody waiting: they
    then wrote models/adapter and the metrics outside `dvc repro`, closed the MLflow run and deleted the
    checkpoints. Each worker calls this first (SIGKILL: it must not publish), and the launcher starts the
    agent with it (SIGTERM: the agent then stops its workers itself)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(
            f"warning: prctl(PR_SET_PDEATHSIG) failed ({os.strerror(err)}); workers may outlive a killed launcher",
            file=sys.stderr,
        )
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)  # the parent died before the signal was armed


def join_restarted_group(num_nodes: int, device: str, env: Mapping[str, str] = os.environ) -> bool:
    """In a worker group that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) on one node: initialise the
    default process group under a key prefix of this restart, before accelerate would; True if it did.

    torchrun's workers exchange their addresses (gloo) or ids (NCCL) through the agent's TCP store. torch 2.13
    keeps that store across restarts and does not prefix the keys per attempt (its comment assumes a new store
    per retry), so a restarted rank could read the previous attempt's address of a peer and dial a port that
    died with it: a flaky "connectFullMesh ... Connection refused" (seen on loopback, with both the static and
    the c10d rendezvous). The restart count is the same for every worker of one node's agent; across nodes the
    agents count their own restarts, so several nodes are left as they are (docs/scaling.md)."""
    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or num_nodes != 1:
        return False
    from datetime import timedelta

    import torch.distributed as dist

    world_size = int(env["WORLD_SIZE"])
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    dist.init_process_group(
        "gloo" if device == "cpu" else "nccl",
        store=dist.PrefixStore(f"restart_{restart}", store),
        rank=int(env["RANK"]),
        world_size=world_size,
        timeout=timedelta(minutes=30),
    )
    print(f"train: rank {env['RANK']} rejoined its group after restart {restart}", file=sys.stderr)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(argv: list[str], env: dict[str, str], what: str, stage: str) -> int:
    """Run a launcher and wait for it; returns its exit code (128 + N when killed by signal N).

    SIGTERM (e.g. from a CI timeout) is passed on to the launcher, which stops the workers; Ctrl-C reaches
    the whole process group by itself, so this process only keeps waiting for the workers to go.
    """
    print(f"{what}: {' '.join(argv)}", file=sys.stderr)
    child = subprocess.Popen(argv, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        print(
            f"error: the {stage} workers failed (exit code {code}); see their messages above", file=sys.stderr
        )
    return 128 - code if code < 0 else code


def worker_env(params: Params, processes: int) -> dict[str, str]:
    env = dict(os.environ)
    if resolve_device(params.train.device) == "cpu":
        # torchrun would pin every worker to 1 thread; share the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def launch(params: Params, worker: bool = False) -> int:
    """Run this node's train workers and wait for them. `worker`: this is a node other than node 0, started
    by `make train-worker` (node 0 is the one that runs `dvc repro`)."""
    from dpo_pipeline import tracking

    t = params.train
    where = placement(os.environ, t.num_nodes, params.launch.master_port)
    if worker and where.rank == 0:
        raise StageError(
            f"--worker: this is node 0 ({where.source}); node 0 runs `dvc repro`, the other nodes the worker"
        )
    if not worker and where.rank != 0:
        raise StageError(
            f"this is node {where.rank} of {where.nodes} ({where.source}): run `make train-worker` here; "
            "`dvc repro` runs on node 0"
        )
    if where.rank == 0:
        tracking.prepare_store(params)
    argv = launch_command(params, where, accelerate_config(params, os.environ))
    what = f"train: node {where.rank} of {where.nodes}, launching {t.num_processes} processes"
    return run_launcher(argv, worker_env(params, t.num_processes), what, "train")


def launch_reference(params: Params) -> int:
    """Run the reference stage as launch.reference_num_processes workers on this machine."""
    from dpo_pipeline import tracking

    n = params.launch.reference_num_processes
    tracking.prepare_store(params)
    argv = launch_command(
        params, this_machine(), None, module="stages.reference", processes=n, max_restarts=0
    )
    return run_launcher(argv, worker_env(params, n), f"reference: launching {n} processes", "reference")
