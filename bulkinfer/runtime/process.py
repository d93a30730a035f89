"""Per-process device settings, decided where the engine runs (a worker), never on the launcher.

    share_accelerator_memory(2)          # before the process's first jax call: each of 2 processes per GPU
                                         # preallocates 0.45 of its memory, not JAX's default 0.75
    use_compilation_cache(WORKER_LOCAL)  # this machine's ~/.cache/bulkinfer/xla, or a path every worker shares
    compiler_options("cpu", os.environ)  # the XLA options the engine compiles each executable with

Several SDK processes on one GPU host (Dataflow starts one per vCPU unless told otherwise; Flink and Spark
start --sdk_worker_parallelism) would each preallocate JAX's default 75% of every GPU and fail.  JAX reads
its GPU client settings from the environment once, when its backend starts, so `BulkInference` calls
`share_accelerator_memory` in `DoFn.setup` before loading the model.  A TPU chip cannot be shared by
processes at all: run one SDK process per TPU host (docs/dataflow.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

PROCESSES_ENV = "BULKINFER_PROCESSES_PER_ACCELERATOR"  # the worker's default for processes_per_accelerator
FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"  # read by every jaxlib; newer ones also read XLA_CLIENT_MEM_FRACTION
_USER_SETTINGS = ("XLA_CLIENT_MEM_FRACTION", FRACTION_ENV, "XLA_PYTHON_CLIENT_PREALLOCATE",
                  "XLA_PYTHON_CLIENT_ALLOCATOR")
USABLE_FRACTION = 0.9  # of a GPU's memory, split between its processes; the rest is CUDA's and the driver's

WORKER_LOCAL = "worker-local"  # compilation_cache_dir: the default cache of the machine the engine runs on

# XLA:CPU options the engine compiles every executable with (per executable, so they take effect however late
# the engine starts, and they never touch the user's other jax code).  LIBRARY_FUSION_TYPE_DOT hands dot
# subgraphs (the attention's batched matmuls with what surrounds them) to YNNPACK instead of XLA's own dot
# emitter.  Measured with bench/xla_cpu.py on an AMD EPYC (Zen 4, AVX-512), jax 0.10.2, one thread, MiniLM:
# CPU seconds per 16 x 128 batch 574 vs 677 ms (ONNX Runtime fp32: 554); 32 x 32 unchanged (RUNTIME.md, 7).
# Packed batches (RUNTIME.md, 9) have no long padded attention and their 2-D dots run faster under XLA's own
# emitter (3-5% less CPU time per batch at every length: `bench/xla_cpu.py packed`), so they compile with XLA's
# defaults.
XLA_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
DEFAULTS_ENV = "BULKINFER_XLA_DEFAULTS"  # "0": compile with XLA's own defaults only


def processes_per_accelerator(value: int | None, environ: Mapping[str, str]) -> int:
    """`value`, else $BULKINFER_PROCESSES_PER_ACCELERATOR, else 1.  Raises ValueError for a count < 1 or
    an environment value that is not an integer (naming the variable)."""
    if value is None:
        text = environ.get(PROCESSES_ENV, "").strip()
        if not text:
            return 1
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"${PROCESSES_ENV}={text!r} is not an integer; set it to the number of SDK "
                             "processes that share each accelerator, e.g. 2") from None
    if value < 1:
        raise ValueError(f"processes_per_accelerator must be >= 1, got {value}")
    return value


def accelerator_memory_env(processes: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables that give one of `processes` processes its share of each GPU.

    {} for one process (JAX's default, preallocating 75%) or when `environ` already holds any of
    XLA_CLIENT_MEM_FRACTION, XLA_PYTHON_CLIENT_MEM_FRACTION, XLA_PYTHON_CLIENT_PREALLOCATE or
    XLA_PYTHON_CLIENT_ALLOCATOR (the user's own setting wins); else
    {"XLA_PYTHON_CLIENT_MEM_FRACTION": 0.9 / processes, rounded down to 3 decimals}.
    Raises ValueError for processes < 1.  The method follows JAX's "GPU memory allocation" notes.
    """
    if processes < 1:
        raise ValueError(f"processes_per_accelerator must be >= 1, got {processes}")
    if processes == 1 or any(environ.get(k) for k in _USER_SETTINGS):
        return {}
    fraction = int(USABLE_FRACTION / processes * 1000) / 1000
    return {FRACTION_ENV: f"{fraction:.3f}"}


def share_accelerator_memory(processes: int | None = None) -> dict[str, str]:
    """Sets `accelerator_memory_env` in this process's environment (processes: see `processes_per_accelerator`)
    and returns what it set.  Call it before the process's first jax computation; once JAX's backend has
    started, the settings cannot change, and a warning says so."""
    env = accelerator_memory_env(processes_per_accelerator(processes, os.environ), os.environ)
    if env and _backend_started():
        log.warning("JAX already started its backend in this process; %s cannot take effect: set it in the "
                    "worker's environment instead", env)
        return {}
    os.environ.update(env)
    return env


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def compilation_cache_dir(value: str | None, environ: Mapping[str, str]) -> str | None:
    """The persistent XLA compilation cache directory for `value`, resolved on this machine.

    None: no cache.  WORKER_LOCAL: this machine's default, $XDG_CACHE_HOME/bulkinfer/xla or
    ~/.cache/bulkinfer/xla, or None when $JAX_COMPILATION_CACHE_DIR is set (JAX uses that itself).
    Anything else: that path, e.g. a directory every worker shares (gs://bucket/xla-cache).
    """
    if value != WORKER_LOCAL:
        return value
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bulkinfer", "xla")


def use_compilation_cache(value: str | None) -> str | None:
    """Points this process's JAX at `compilation_cache_dir(value)` (every compile is cached); returns it."""
    path = compilation_cache_dir(value, os.environ)
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def compiler_options(platform: str, environ: Mapping[str, str], *, packed: bool = False) -> dict[str, str]:
    """The XLA options the engine compiles with on `platform` ("cpu", "gpu", "tpu"): `XLA_CPU_OPTIONS` on
    cpu for padded batches, {} for packed ones and elsewhere.  An option the user names in $XLA_FLAGS is left out (the user's own setting wins),
    and $BULKINFER_XLA_DEFAULTS=0 leaves out all of them.  Raises ValueError for another value of that variable.
    """
    switch = environ.get(DEFAULTS_ENV, "1").strip()
    if switch not in ("0", "1"):
        raise ValueError(f"${DEFAULTS_ENV}={switch!r}; set it to 0 (XLA's own defaults) or 1 (bulkinfer's)")
    if platform != "cpu" or switch == "0" or packed:
        return {}
    user = environ.get("XLA_FLAGS", "")
    return {name: value for name, value in XLA_CPU_OPTIONS.items() if f"--{name}=" not in user and
            f"--{name} " not in f"{user} "}
