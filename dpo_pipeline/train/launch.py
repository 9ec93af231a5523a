"""Several processes / GPUs: torchrun on CPU (gloo), accelerate on GPUs.

Several processes (`train.num_processes` > 1): `python -m stages.train` re-launches itself as that many
workers and exits with their exit code (see `launch_command`). On the CPU (`train.device: cpu`) the launcher
is torchrun (`python -m torch.distributed.run`, gloo backend; `accelerate launch --cpu` started only one
process here); on CUDA it is `accelerate launch --multi_gpu` (DDP, one GPU per process, `--mixed_precision`
from `train.precision`). Each worker takes its own micro-batches of per_device_train_batch_size pairs, so
the global batch is per_device_train_batch_size * num_processes * gradient_accumulation_steps. Only rank 0 opens the MLflow run
and writes models/adapter, the metrics and the history; throughput counts are summed over the processes.
DDP takes the 4-bit base and the LoRA layers as they are (checked with gloo on the CPU, with and without
gradient checkpointing): only the LoRA weights require gradients and get synchronized, and the ranks end with
identical adapters. `ddp_find_unused_parameters` is False because every LoRA weight is used in every step;
the Trainer's default for a PEFT model (True) works too but searches the graph for unused weights each step.

FSDP or DeepSpeed on several GPUs: write an accelerate config file (`accelerate config`, or a YAML with
`distributed_type: FSDP` / `DEEPSPEED` and its `fsdp_config` / `deepspeed_config`) and point
ACCELERATE_CONFIG_FILE at it; the stage then runs `accelerate launch --config_file $ACCELERATE_CONFIG_FILE`
without `--multi_gpu`, so the file picks the distributed type, while `--num_processes` and
`--mixed_precision` still come from params. The file changes how the work is spread, not what is computed,
so it is not a DVC param. Only DDP is tested (on the CPU with gloo): a 4-bit 7B fits on one GPU, which DDP
needs; sharding the 4-bit weights with FSDP / ZeRO-3 additionally needs bitsandbytes' `bnb_4bit_quant_storage`
set to the compute dtype and a sharded save of the adapter, which this stage does not do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dpo_pipeline.models.loading import (
    resolve_device,
)

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> accelerate's flag


def is_distributed_worker(env: Mapping[str, str]) -> bool:
    """True inside a process started by torchrun / accelerate launch (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in env or "WORLD_SIZE" in env


def launch_command(
    params: Params, port: int, config_file: str | None = None, python: str = sys.executable
) -> list[str]:
    """argv that runs this stage as `train.num_processes` workers on one machine.

    CPU: torchrun (gloo). CUDA: accelerate launch, DDP unless `config_file` (an accelerate config file,
    e.g. FSDP or DeepSpeed) says otherwise. `port` is the rendezvous port on 127.0.0.1.
    """
    t = params.train
    n = str(t.num_processes)
    if resolve_device(t.device) == "cpu":
        return [
            python, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", n,
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "stages.train",
        ]  # fmt: skip
    distribution = (
        ["--config_file", config_file] if config_file else ["--multi_gpu", "--dynamo_backend", "no"]
    )
    return [
        python, "-m", "accelerate.commands.launch",
        *distribution,
        "--num_machines", "1", "--num_processes", n,
        "--mixed_precision", MIXED_PRECISION[t.precision],
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "-m", "stages.train",
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(params: Params) -> int:
    """Run the workers and wait for them; returns their launcher's exit code (128 + N when killed by signal N).

    SIGTERM (e.g. from a CI timeout) is passed on to the launcher, which stops the workers; Ctrl-C reaches
    the whole process group by itself, so this process only keeps waiting for the workers to go.
    """
    from dpo_pipeline import tracking

    tracking.prepare_store(params)
    argv = launch_command(params, free_port(), os.environ.get("ACCELERATE_CONFIG_FILE") or None)
    env = dict(os.environ)
    if resolve_device(params.train.device) == "cpu":
        # torchrun would pin every worker to 1 thread; share the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // params.train.num_processes)))
    print(f"train: launching {params.train.num_processes} processes: {' '.join(argv)}", file=sys.stderr)
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
            f"error: the train workers failed (exit code {code}); see their messages above", file=sys.stderr
        )
    return 128 - code if code < 0 else code
