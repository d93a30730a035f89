"""Weights from any Beam filesystem, identified by their content, cached on each worker.

    params = load_params("gs://bucket/ckpt.safetensors")   # or an Orbax directory, or a pytree
    digest = fingerprint("gs://bucket/ckpt")               # sha256 of the content, not of the path
    local = fetch("gs://bucket/ckpt", digest)              # on a worker: a checked local copy

A model is identified by `fingerprint` (content), never by the launcher's path, so a spec built on a
laptop loads on remote workers, and a job resumes after the files move.  Paths are read through Beam's
`FileSystems`, so every filesystem Beam knows (local, gs://, s3://, hdfs://, ...) works.

Worker cache: `$BULKINFER_CACHE_DIR/<digest>/`, by default `$XDG_CACHE_HOME/bulkinfer/weights/<digest>/`
(`~/.cache/...` without XDG_CACHE_HOME).  An entry is written under a temporary name and renamed into place,
so concurrent processes never see half a copy; the first rename wins and the others use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bulkinfer.models.checkpoint import CheckpointError
from bulkinfer.models.safetensors_file import load_safetensors, nest

_CHUNK = 8 << 20  # bytes read at a time when hashing or copying
_RAW = CompressionTypes.UNCOMPRESSED  # never let a ".gz" name decompress weights behind our back
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
_EXPECTED = "expected a .safetensors file or an Orbax checkpoint directory"

# (full path, size, mtime or the filesystem's checksum) -> sha256 hex of that file's bytes.
_file_digests: dict[tuple[str, int, Any], str] = {}
_memo_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------- listing
def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def _stamp(meta) -> Any:
    """What says a remote file changed without reading it: its mtime, else the filesystem's checksum."""
    if meta.last_updated_in_seconds:
        return meta.last_updated_in_seconds
    return FileSystems.checksum(meta.path)


def _listing(path: str) -> tuple[bool, list[tuple[str, str, int, Any]]]:
    """(is a directory, [(relative name, full path, size, stamp)] sorted by name); [] when nothing is there.

    A directory is every file below it, recursively (on object stores: every object under `path/`).
    Local trees are walked with os (glob characters in a local name are fine); others with
    FileSystems.match."""
    path = path.rstrip("/") or "/"
    if _is_local(path):
        if os.path.isfile(path):
            st = os.stat(path)
            return False, [("", path, st.st_size, st.st_mtime_ns)]
        entries = []
        for dirpath, _, files in os.walk(path):
            for name in files:
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                entries.append((os.path.relpath(full, path).replace(os.sep, "/"), full, st.st_size, st.st_mtime_ns))
        return os.path.isdir(path), sorted(entries)
    exact = [m for m in FileSystems.match([path])[0].metadata_list if m.path == path]
    if exact:
        return False, [("", path, exact[0].size_in_bytes, _stamp(exact[0]))]
    prefix = path + "/"
    metas = FileSystems.match([prefix + "**"])[0].metadata_list
    entries = [(m.path[len(prefix):], m.path, m.size_in_bytes, _stamp(m))
               for m in metas if m.path.startswith(prefix) and not m.path.endswith("/")]
    return True, sorted(entries)


def _nonempty_listing(path: str, expected: str) -> tuple[bool, list[tuple[str, str, int, Any]]]:
    """`_listing(path)`; raises CheckpointError naming the path and `expected` when nothing is there."""
    is_dir, entries = _listing(path)
    if not entries:
        what = "an empty directory" if is_dir else "no such file or directory"
        raise CheckpointError(f"{path}: {what}; {expected}")
    return is_dir, entries


def _sha_of_file(full: str, size: int, stamp: Any) -> str:
    key = (full, size, stamp)
    with _memo_lock:
        if key in _file_digests:
            return _file_digests[key]
    h = hashlib.sha256()
    with FileSystems.open(full, compression_type=_RAW) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _memo_lock:
        _file_digests[key] = digest
    return digest


def _tree_digest(file_digests: list[tuple[str, str]]) -> str:
    """sha256 over `<relative name>\\0<sha256 of its bytes>\\n`, sorted by name."""
    h = hashlib.sha256()
    for rel, digest in sorted(file_digests):
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, or of a directory tree (its files' relative names and bytes, sorted).

    A directory's digest is the sha256 of the sorted lines `<relative name>\\0<sha256 of the file>\\n`,
    so equal content in two places gives one digest and any changed byte or name another.  Each file's
    digest is memoized in this process by (path, size, mtime), or by the filesystem's checksum where it
    reports no mtime; a rewrite that keeps both size and mtime is not noticed within a process.

    Raises CheckpointError when nothing is at `path`.

        >>> fingerprint("gs://bucket/model-dir")
        '3f1c...'
    """
    path = os.fspath(path)
    is_dir, entries = _nonempty_listing(path, "expected model weights there")
    if not is_dir:
        return _sha_of_file(*entries[0][1:])
    return _tree_digest([(rel, _sha_of_file(full, size, stamp)) for rel, full, size, stamp in entries])


def pytree_fingerprint(params) -> str:
    """sha256 hex over a pytree's sorted key paths, and each leaf's dtype, shape and bytes.

    Equal arrays under equal key paths give one digest, whatever the container order or array type
    (numpy or jax)."""
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    h = hashlib.sha256()
    for key, leaf in sorted(((jax.tree_util.keystr(k), v) for k, v in leaves), key=lambda kv: kv[0]):
        a = np.asarray(leaf, order="C")
        h.update(f"{key}\0{a.dtype.name}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """The weights cache root: $BULKINFER_CACHE_DIR, else $XDG_CACHE_HOME/bulkinfer/weights (~/.cache)."""
    override = os.environ.get("BULKINFER_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bulkinfer" / "weights"


def _cached(digest: str) -> Path | None:
    """The cache entry for `digest` (the directory, or the one file of a file's entry), checked, or None."""
    entry = cache_dir() / digest
    if not entry.is_dir():
        return None
    files = [p for p in entry.rglob("*") if p.is_file()]
    if len(files) == 1 and files[0].parent == entry and fingerprint(files[0]) == digest:
        return files[0]
    if files and fingerprint(entry) == digest:
        return entry
    raise CheckpointError(
        f"the weights cache entry {entry} does not hold content {digest}; delete that directory and rerun"
    )


def _remember(key: tuple[str, int, Any], digest: str) -> None:
    with _memo_lock:
        _file_digests[key] = digest


def _download(path: str, expected: str | None) -> tuple[Path, str]:
    """Copies `path` (a file or a directory tree, any filesystem) into the cache; (local path, digest).

    Hashes while copying, checks `expected` before the entry becomes visible, renames atomically."""
    is_dir, entries = _listing(path)
    if not entries:
        raise CheckpointError(f"{path}: no such file or directory; expected model weights there")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        copied = {}  # name inside the entry -> sha256 of its bytes
        for rel, full, size, stamp in entries:
            name = rel or full.rsplit("/", 1)[-1]
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with FileSystems.open(full, compression_type=_RAW) as src, open(target, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            copied[name] = h.hexdigest()
            _remember((full, size, stamp), copied[name])
        digest = _tree_digest(list(copied.items())) if is_dir else next(iter(copied.values()))
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"{path}: content has digest {digest}, but the model spec expects {expected}; the weights "
                "changed after the spec was made: rebuild the spec (or restore the original files)"
            )
        entry = root / digest
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not a lost race with another process: a real failure
                raise
        else:  # our copy: its files' digests are known, so checking the entry reads nothing again
            for rel, full, size, stamp in _listing(str(entry))[1]:
                if rel in copied:
                    _remember((full, size, stamp), copied[rel])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached(digest), digest


def fetch(path: str | os.PathLike, digest: str) -> Path:
    """A local path holding the content `digest` of `path`, a file or directory on any Beam filesystem.

    A local `path` that exists is used in place (after checking its digest).  Otherwise (a remote
    filesystem, or the launcher's local path absent on this worker) the worker cache is used, filled by
    copying `path` when it can be read.  A file's cache entry is `<cache>/<digest>/<file name>`.

    Raises CheckpointError when the content's digest is not `digest` (naming both), or when neither the
    path nor the cache has it.

        >>> local = fetch("gs://bucket/digits.safetensors", spec.digest)
    """
    path = os.fspath(path)
    if _is_local(path) and os.path.exists(path):
        found = fingerprint(path)
        if found != digest:
            raise CheckpointError(
                f"{path}: content has digest {found}, but the model spec expects {digest}; the weights "
                "changed after the spec was made: rebuild the spec (or restore the original files)"
            )
        return Path(path)
    cached = _cached(digest)
    if cached is not None:
        return cached
    if _is_local(path):
        raise CheckpointError(
            f"{path} is not on this machine and the weights cache {cache_dir()} has no copy of {digest}; "
            "put the weights on a filesystem every worker can read (gs://..., s3://...) and pass that path"
        )
    return _download(path, digest)[0]


def to_local(path: str | os.PathLike) -> tuple[Path, str]:
    """(a local path with the content of `path`, its digest): a local path in place, others via the cache
    (one read of the remote files; none when this process already knows their digest and the cache has it).
    """
    path = os.fspath(path)
    if _is_local(path):
        return Path(path), fingerprint(path)
    is_dir, entries = _listing(path)
    with _memo_lock:
        known = [(rel, _file_digests.get((full, size, stamp))) for rel, full, size, stamp in entries]
    if entries and all(d is not None for _, d in known):
        digest = _tree_digest(known) if is_dir else known[0][1]
        cached = _cached(digest)
        if cached is not None:
            return cached, digest
    return _download(path, None)


# ------------------------------------------------------------------------------------------------- orbax
def _load_orbax(directory: Path) -> Any:
    """Restores an Orbax checkpoint directory into numpy arrays on the host (no device placement)."""
    try:
        import jax
        import orbax.checkpoint as ocp
    except ImportError:
        raise CheckpointError(
            f"{directory} is an Orbax checkpoint; reading it needs orbax-checkpoint: pip install 'bulkinfer[orbax]'"
        ) from None
    try:
        checkpointer = ocp.PyTreeCheckpointer()
        meta = checkpointer.metadata(directory).item_metadata
        tree = getattr(meta, "tree", meta)
        if tree is None:
            raise ValueError("it holds no pytree metadata")
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise many types; the path and cause are what matter
        raise CheckpointError(f"{directory}: cannot restore the Orbax checkpoint ({type(e).__name__}: {e})") from None
    return jax.tree.map(np.asarray, restored)


def _not_weights_hint(directory: Path) -> str:
    steps = sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    if steps:
        return f"; it looks like a CheckpointManager directory: pass one step, e.g. {directory / str(steps[0])}"
    items = [p for p in directory.iterdir() if p.is_dir() and any((p / m).exists() for m in _ORBAX_MARKERS)]
    if items:
        return f"; pass the checkpoint item inside it, e.g. {items[0]}"
    return ""


def load_params(source) -> Any:
    """Parameters as a pytree of numpy arrays, from a pytree, a `.safetensors` file or an Orbax directory.

    source: a pytree (leaves become numpy arrays; the caller's containers are not modified); or a path on
      any Beam filesystem to a `.safetensors` file (flat names, `a.b.c` nests into
      `{"a": {"b": {"c": ...}}}`) or to an Orbax checkpoint directory (restored on the host).  Remote
      directories are copied into the worker cache first.

    Raises CheckpointError for a path that is neither, naming the path and what was expected.

        >>> params = load_params("gs://bucket/digits.safetensors")
        >>> params["conv1"]["w"].shape
        (3, 3, 1, 16)
    """
    if not isinstance(source, (str, os.PathLike)):
        import jax

        return jax.tree.map(np.asarray, source)
    path = os.fspath(source)
    is_dir, _ = _nonempty_listing(path, _EXPECTED)
    if not is_dir:
        try:
            return nest(load_safetensors(path))
        except CheckpointError as e:
            raise CheckpointError(f"{e}; {_EXPECTED}") from None
    local = Path(path) if _is_local(path) else to_local(path)[0]
    if not any((local / m).exists() for m in _ORBAX_MARKERS):
        raise CheckpointError(
            f"{path}: a directory but not an Orbax checkpoint (none of {', '.join(_ORBAX_MARKERS)}); "
            f"{_EXPECTED}{_not_weights_hint(local)}"
        )
    return _load_orbax(local)
