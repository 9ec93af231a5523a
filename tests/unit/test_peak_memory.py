"""dpo_pipeline.models.loading.peak_memory_mb on the CPU: this process's own peak RSS, not an inherited one."""

from __future__ import annotations

import builtins
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_pipeline.models.loading import peak_memory_mb

REPO = Path(__file__).resolve().parents[2]
PARENT_MB = 600  # what the parent touches before starting the child: well above an idle child with torch


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_child_of_a_big_parent_reports_its_own_peak():
    # ru_maxrss survives fork + exec, so a child started by a parent holding PARENT_MB would report at least
    # that much; VmHWM starts afresh at exec. (The parent is a process of its own, so pytest is untouched.)
    script = textwrap.dedent(
        f"""
        import json, resource, subprocess, sys
        block = b"\\x01" * ({PARENT_MB} << 20)  # written, so resident
        child = subprocess.run(
            [sys.executable, "-c", "from dpo_pipeline.models.loading import peak_memory_mb; print(peak_memory_mb('cpu'))"],
            capture_output=True, text=True, check=True,
        )
        print(json.dumps({{
            "child_mb": float(child.stdout.strip().splitlines()[-1]),
            "child_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO, env=env
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["parent_mb"] > PARENT_MB
    # The kernel's inherited figure for the child is at least the parent's size at fork ...
    assert figures["child_ru_maxrss_mb"] > PARENT_MB
    # ... while peak_memory_mb reports what the child itself touched (torch imported: ~200-300 MB).
    assert 20 < figures["child_mb"] < PARENT_MB - 100


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_follows_this_process_vmhwm():
    def vmhwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    before = peak_memory_mb("cpu")
    assert abs(before - vmhwm_mb()) < 5
    block = b"\x01" * (64 << 20)
    after = peak_memory_mb("cpu")
    assert after >= before
    assert after >= vmhwm_mb() - 5
    del block


def test_falls_back_to_ru_maxrss_without_proc(monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_memory_mb("cpu") == pytest.approx(expected, rel=0.05)
