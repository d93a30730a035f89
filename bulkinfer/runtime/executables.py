"""Compiled executables on local disk, found without tracing or lowering: a warm process's fast start.

JAX's persistent compilation cache is keyed by the lowered module, so every process still traces and
lowers each batch shape before it can look the executable up: about 1.7 s of main-thread time for the 23
MiniLM shapes of a 3,000-row job on a 2-core CPU (RUNTIME.md section 8).  This cache is keyed instead by everything that decides the
executable, known before tracing:

- `code_key`: the caller's word for the function, e.g. `source_digest()` of the modules that define
  it plus the model's settings.  The caller vouches for it: a function whose code may change without a
  new key (a user's own function, which may call helpers anywhere) must not use this cache.
- the parameters' tree structure, shapes, dtypes and shardings, and the batch's shapes, dtypes and
  shardings; the source of the engine modules that wrap the function (`ENGINE_MODULES`);
- the devices (ids, kind, platform, the mesh's axes) and the platform's version; on the CPU also the
  host's model name and instruction-set flags (XLA:CPU compiles for the host's own ISA) and the number
  of cores this process may use;
- jax and jaxlib versions, the compile options, $XLA_FLAGS and the jax settings that change lowering.

    cache = ExecutableCache("/path/xla-cache/bulkinfer-executables", code_key)
    exe = cache.load(key_parts)              # a jax.stages.Compiled, or None
    cache.store(key_parts, lowered.compile())

Entries are files `<sha256>.exe` written atomically (a temporary name, then `os.replace`), so processes
sharing the directory never read a partial file.  Loading one unpickles it (jax's
`serialize_executable`): keep the directory as private as the code it caches, as for JAX's own cache.
A file that fails to load is logged and ignored (the caller compiles), never an error.

Nothing is stored while JAX's own persistent cache is in use in the process (`jax_cache_in_use`): an
executable it served fails to run once stored.  A model using this cache therefore leaves JAX's off
(`LoadedTextEmbedder` does).  Files are written owner-only (the directory 0700, entries 0600), and a file
that another user owns or others may write is not loaded.  Each change of the code key (a new bulkinfer
version, say) adds a set of files; a load marks its entry used (its modification time), and the first
store of a process deletes the entries unused for `max_age_days` (default 30) and temporary files a
killed writer left over a day ago.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import jax

log = logging.getLogger(__name__)

SUBDIR = "bulkinfer-executables"  # under a compilation cache directory
# The modules that turn a function into the program compiled (jit, shardings, the batch layout).
ENGINE_MODULES = ("bulkinfer.runtime.engine", "bulkinfer.runtime.inputs", "bulkinfer.runtime.sharding")
# jax settings that change what a function lowers to (dtypes, precision, PRNG layout).
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
                 "jax_default_prng_impl", "jax_numpy_dtype_promotion")


def source_digest(*modules: str) -> str:
    """sha256 over the names and source bytes of the named modules (e.g. "bulkinfer.models.bert"): a code
    key for functions defined there that call nothing outside them but jax and numpy."""
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + _source(name) + b"\0")
    return h.hexdigest()


@functools.cache
def _source(module: str) -> bytes:
    import importlib

    return Path(importlib.import_module(module).__file__).read_bytes()


def jax_cache_in_use(environ: Mapping[str, str] = os.environ) -> bool:
    """True when JAX's own persistent compilation cache is configured in this process (its directory set
    in jax's config or $JAX_COMPILATION_CACHE_DIR).  An executable compiled then may be one that cache
    served (also through jit's in-memory cache, which reports no event); serialized again, such an
    executable fails to run in another process (jaxlib 0.10.2 on the CPU: "NOT_FOUND: Function ... not
    found").  So nothing is stored while it is in use."""
    return bool(jax.config.jax_compilation_cache_dir or environ.get("JAX_COMPILATION_CACHE_DIR"))


@functools.cache
def _host_cpu() -> str:
    """The CPU's model name and flags (Linux /proc/cpuinfo), else the machine type."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(keep))  # one line per distinct value


def key_parts(*, params, batch_spec: Mapping, mesh, compiler_options: Mapping[str, str],
              environ: Mapping[str, str]) -> dict[str, str]:
    """What, besides the function's code, decides an executable: the argument types, the devices, the
    versions and settings (see the module docstring).  Values are strings, for hashing."""
    devices = list(mesh.devices.flat)
    client = devices[0].client
    leaves, tree = jax.tree_util.tree_flatten(params)
    param_types = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    parts = {
        "params": f"{tree}\n{param_types}",
        "batch": repr(sorted((k, tuple(v.shape), str(v.dtype), str(v.sharding)) for k, v in batch_spec.items())),
        "engine": source_digest(*ENGINE_MODULES),
        "devices": repr([(d.id, d.platform, d.device_kind) for d in devices]) + repr(dict(mesh.shape)),
        "platform": f"{client.platform} {client.platform_version}",
        "versions": f"jax {jax.__version__} jaxlib {jax.lib.__version__}",
        "options": repr(sorted(compiler_options.items())),
        "env": repr([environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")]),
        "settings": repr([(k, str(getattr(jax.config, k, None))) for k in _JAX_SETTINGS]),
    }
    if client.platform == "cpu":
        parts["host"] = f"{_host_cpu()}\ncores {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
    return parts


class ExecutableCache:
    """Serialized `jax.stages.Compiled` executables in `directory`, keyed by `code_key` and `key_parts`.

    directory: a local directory (created on the first store).
    code_key: what identifies the function's code and settings (see the module docstring).
    max_age_days: entries neither loaded nor stored for this many days are deleted by the first store
      of this instance (stale code keys, shapes no job uses any more).
    """

    def __init__(self, directory: str | os.PathLike, code_key: str, *, max_age_days: float = 30.0):
        self.directory = Path(directory)
        self.code_key = code_key
        self.max_age_days = max_age_days
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self._swept = False

    @classmethod
    def beside(cls, compilation_cache_dir: str | None, code_key: str) -> ExecutableCache | None:
        """The cache in `compilation_cache_dir`/SUBDIR, or None without a directory or for a URL
        (gs://...: there JAX's own cache serves, after tracing and lowering)."""
        if not compilation_cache_dir or "://" in compilation_cache_dir:
            return None
        return cls(Path(compilation_cache_dir) / SUBDIR, code_key)

    def _path(self, parts: Mapping[str, str]) -> Path:
        h = hashlib.sha256(self.code_key.encode())
        for name in sorted(parts):
            h.update(b"\0" + name.encode() + b"\0" + parts[name].encode())
        return self.directory / f"{h.hexdigest()}.exe"

    def load(self, parts: Mapping[str, str], devices) -> jax.stages.Compiled | None:
        """The executable stored under these parts, loaded onto `devices` (the mesh's, in its order),
        or None when there is none or it cannot be loaded (logged)."""
        from jax.experimental import serialize_executable

        path = self._path(parts)
        try:
            info = path.stat()
            if info.st_mode & 0o022 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
                log.warning("not loading the cached executable %s: another user owns it or others may write it "
                            "(mode %o); compiling instead", path, info.st_mode & 0o777)
                self.misses += 1
                return None
            blob = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:
            log.warning("cannot read the cached executable %s (%s); compiling instead", path, e)
            self.misses += 1
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(blob)
            exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                            backend=devices[0].client,
                                                            execution_devices=list(devices))
        except Exception as e:  # noqa: BLE001 - a stale or damaged entry only costs a compile
            log.warning("cannot load the cached executable %s (%s: %s); compiling instead", path,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.misses += 1
            return None
        self.hits += 1
        try:
            os.utime(path)  # used: kept by `_sweep` for another max_age_days
        except OSError:
            pass  # a read-only cache still serves
        return exe

    def store(self, parts: Mapping[str, str], compiled: jax.stages.Compiled) -> bool:
        """Writes `compiled` under these parts; False when JAX's own cache is in use (`jax_cache_in_use`),
        or (logged) when it cannot be serialized or written."""
        from jax.experimental import serialize_executable

        if jax_cache_in_use():
            return False
        path = self._path(parts)
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation; the executable still runs
            log.warning("cannot cache the executable in %s (%s: %s)", self.directory, type(e).__name__, e)
            return False
        if not self._swept:
            self._swept = True
            self._sweep()
        return True

    def _sweep(self) -> None:
        """Deletes entries unused for max_age_days and temporary files older than a day."""
        now = time.time()
        for entry in self.directory.iterdir():
            try:
                age_days = (now - entry.stat().st_mtime) / 86400
            except OSError:
                continue  # deleted by another process's sweep meanwhile
            if (entry.suffix == ".exe" and age_days > self.max_age_days) or (entry.suffix == ".tmp" and age_days > 1):
                try:
                    entry.unlink()
                    self.evicted += 1
                except OSError:
                    pass  # another process's sweep, or a file not ours to delete
        if self.evicted:
            log.info("deleted %d cached executables unused for %g days from %s", self.evicted, self.max_age_days,
                     self.directory)
