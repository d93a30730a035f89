"""Safetensors files on any Beam filesystem: read streamed (bfloat16 and float8 too, through ml_dtypes),
written with the safetensors library; flat dotted names nest into dicts and back.

    params = nest(load_safetensors("gs://bucket/cnn.safetensors"))   # {"conv1": {"w": ...}, ...}
    save_safetensors(params, "cnn.safetensors")                      # names "conv1.w", ...

Format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the tensors' bytes (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from bulkinfer.models.checkpoint import CheckpointError

_CHUNK = 8 << 20  # bytes read at a time
_RAW = CompressionTypes.UNCOMPRESSED  # never let a ".gz" name decompress weights behind our back

_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "F32": "float32", "F64": "float64",
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _read_exact(f, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        chunk = f.read(min(n - got, _CHUNK))
        if not chunk:
            break
        view[got:got + len(chunk)] = chunk
        got += len(chunk)
    if got != n:
        raise EOFError(f"expected {n} bytes, the file ended after {got}")
    return buf


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file on any Beam filesystem -> {flat name: numpy array} (bfloat16 and float8 via
    ml_dtypes, which safetensors' own numpy loader lacks).  Streams the file once.

    Raises CheckpointError for a file that is not safetensors (naming the path).

    Format: https://github.com/huggingface/safetensors ("Format": u64 header size, JSON header, bytes).
    """
    path = os.fspath(path)
    try:
        with FileSystems.open(path, compression_type=_RAW) as f:
            (n,) = struct.unpack("<Q", _read_exact(f, 8))
            if not 2 <= n <= 100 << 20:
                raise ValueError(f"header size {n} is not plausible")
            header = json.loads(bytes(_read_exact(f, n)))
            header.pop("__metadata__", None)
            tensors, pos = {}, 0
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which bulkinfer does not read")
                dtype = _np_dtype(_ST_DTYPES[info["dtype"]])
                if start != pos or end - start != dtype.itemsize * int(np.prod(info["shape"])):
                    raise ValueError(f"tensor {name!r} has inconsistent offsets {info['data_offsets']}")
                tensors[name] = np.frombuffer(_read_exact(f, end - start), dtype).reshape(tuple(info["shape"]))
                pos = end
    except (ValueError, EOFError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    return tensors


def _flatten(params, prefix: str = "") -> dict[str, np.ndarray]:
    if not isinstance(params, dict):
        raise TypeError(
            f"{prefix or 'params'} is a {type(params).__name__}; safetensors names nest dicts only "
            "(use {'0': ..., '1': ...} for a list)"
        )
    flat = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"key {key!r} under {prefix or 'the root'} must be a non-empty str without '.'")
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        elif isinstance(value, (list, tuple)) or value is None:
            _flatten(value, name)  # raises, naming the key
        else:
            a = np.asarray(value, order="C")
            if a.dtype.name not in _ST_DTYPES.values():
                raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
            flat[name] = a
    return flat


def nest(flat: dict[str, np.ndarray]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}.  Raises CheckpointError when a name is also a prefix."""
    tree: dict = {}
    for name in sorted(flat):
        node, parts = tree, name.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"tensor {'.'.join(parts[:i + 1])!r} is also a prefix of {name!r}")
        if parts[-1] in node:
            raise CheckpointError(f"tensor {name!r} is also a prefix of other tensors' names")
        node[parts[-1]] = flat[name]
    return tree


def save_safetensors(params: dict, path: str | os.PathLike) -> None:
    """Writes a nested dict of arrays as one `.safetensors` file with dotted names (`a.b.c`), on any Beam
    filesystem; `load_params(path)` gives the dict back.

    Raises TypeError for a non-dict container or a dtype safetensors cannot hold, ValueError for a key
    that is not a str or contains '.'.

        >>> save_safetensors({"dense": {"w": np.ones((2, 3), np.float32)}}, "/tmp/p.safetensors")
        >>> load_params("/tmp/p.safetensors")["dense"]["w"].shape
        (2, 3)
    """
    from safetensors.numpy import save

    data = save(_flatten(params))
    with FileSystems.create(os.fspath(path), compression_type=_RAW) as f:
        f.write(data)
