"""Whole-process rows: a command run as a fresh process from start to exit, its wall time, and the CPU
seconds of it and every descendant it waited for (`os.times()` children fields)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.timing import Timing

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict:
    """This environment with the repository root first on PYTHONPATH (so the checkout under test is the
    bulkinfer imported, whatever the venv's editable install points at) and JAX on the CPU by default."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "HF_HUB_OFFLINE": "1", **extra}


def run(cmd: list[str]) -> tuple[Timing, str]:
    """Runs cmd from the repository root; returns (its Timing, its stdout).  Raises RuntimeError with the
    end of its stderr if it fails."""
    t = Timing(load_before=os.getloadavg()[0])
    c0, w0 = os.times(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    c1 = os.times()
    t.wall_s = time.perf_counter() - w0
    t.cpu_s = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return t, proc.stdout
