"""Per-process device settings: each process's share of a GPU, and where its compilation cache lives."""

import os
import subprocess
import sys

import pytest

from bulkinfer.runtime.process import (
    DEFAULTS_ENV,
    FRACTION_ENV,
    PROCESSES_ENV,
    WORKER_LOCAL,
    XLA_CPU_OPTIONS,
    accelerator_memory_env,
    compilation_cache_dir,
    compiler_options,
    processes_per_accelerator,
)


@pytest.mark.parametrize("processes, fraction", [(2, "0.450"), (3, "0.300"), (4, "0.225"), (7, "0.128")])
def test_processes_sharing_a_gpu_split_ninety_percent_of_it(processes, fraction):
    env = accelerator_memory_env(processes, {})
    assert env == {FRACTION_ENV: fraction}
    assert processes * float(env[FRACTION_ENV]) <= 0.9


def test_one_process_keeps_jax_defaults_and_the_users_own_setting_wins():
    assert accelerator_memory_env(1, {}) == {}
    for name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
        assert accelerator_memory_env(4, {name: "false" if "PREALLOCATE" in name else "0.5"}) == {}
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        accelerator_memory_env(0, {})


def test_the_process_count_comes_from_the_option_else_the_workers_environment():
    assert processes_per_accelerator(None, {}) == 1
    assert processes_per_accelerator(None, {PROCESSES_ENV: "4"}) == 4
    assert processes_per_accelerator(2, {PROCESSES_ENV: "4"}) == 2
    with pytest.raises(ValueError, match=rf"\${PROCESSES_ENV}='two' is not an integer"):
        processes_per_accelerator(None, {PROCESSES_ENV: "two"})
    with pytest.raises(ValueError, match="must be >= 1, got -1"):
        processes_per_accelerator(-1, {})


def test_the_setting_reaches_the_environment_before_jax_starts_and_not_after():
    code = ("import os, jax; from bulkinfer.runtime.process import share_accelerator_memory as s; "
            "print(s(), os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')); jax.numpy.zeros(1).block_until_ready(); "
            "os.environ.pop('XLA_PYTHON_CLIENT_MEM_FRACTION'); print(s())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, PROCESSES_ENV: "3", "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # Before the backend: set.  After it (the variable removed to tempt it): refused with a warning.
    assert out.stdout.splitlines() == ["{'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.300'} 0.300", "{}"]
    assert "cannot take effect" in out.stderr


def test_the_worker_local_compilation_cache_is_resolved_from_the_workers_environment(tmp_path):
    assert compilation_cache_dir(WORKER_LOCAL, {"HOME": str(tmp_path)}) == str(tmp_path / ".cache/bulkinfer/xla")
    assert compilation_cache_dir(WORKER_LOCAL, {"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == "/c/bulkinfer/xla"
    assert compilation_cache_dir(WORKER_LOCAL, {"JAX_COMPILATION_CACHE_DIR": "/j"}) is None  # JAX's own
    assert compilation_cache_dir("gs://bucket/xla", {"HOME": "/h"}) == "gs://bucket/xla"
    assert compilation_cache_dir(None, {"HOME": "/h"}) is None


def test_cpu_executables_get_bulkinfer_options_unless_the_user_sets_them():
    (name,) = XLA_CPU_OPTIONS
    assert compiler_options("cpu", {}) == XLA_CPU_OPTIONS
    assert compiler_options("cpu", {}, packed=True) == {}  # packed batches: XLA's own dot emitter is faster
    assert compiler_options("gpu", {}) == {} and compiler_options("tpu", {}) == {}
    assert compiler_options("cpu", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}) == XLA_CPU_OPTIONS
    for flags in (f"--{name}=", f"--xla_dump_to=/tmp/x --{name}=dot", f"--{name}"):
        assert compiler_options("cpu", {"XLA_FLAGS": flags}) == {}, flags
    assert compiler_options("cpu", {DEFAULTS_ENV: "0"}) == {}
    assert compiler_options("cpu", {DEFAULTS_ENV: "1"}) == XLA_CPU_OPTIONS
    with pytest.raises(ValueError, match=rf"\${DEFAULTS_ENV}='off'; set it to 0"):
        compiler_options("cpu", {DEFAULTS_ENV: "off"})
