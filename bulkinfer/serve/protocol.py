"""The Open Inference Protocol (KServe v2) REST wire format, with the binary tensor data extension.

A request or response body is a JSON object, optionally followed by raw tensor bytes.  When raw
bytes follow, the HTTP header `Inference-Header-Content-Length` gives the JSON part's length and
each binary tensor says its byte count in `parameters.binary_data_size`; the tensors' bytes follow
the JSON in the order the tensors are listed.  Numbers are little-endian and row-major; a BYTES
element is a 4-byte little-endian length followed by that many bytes.

    >>> header, tail = encode_infer_request("text", ["a", "b"], output="embedding")
    >>> len(tail)                                  # 2 x (4-byte length + 1 byte)
    10

Only JSON is parsed here (`json.loads`), never pickles.  Both the server and the client use this module.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Sequence

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatypes we may send or receive as numbers, and their little-endian numpy dtypes.
NUMERIC_DTYPES = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
_LEN = struct.Struct("<I")

# Error messages quote what the client sent; a short repr keeps a 60 MB list or a 900-deep nesting out of them.
_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxstring, _short_repr.maxother = 3, 80, 80
_short_repr.maxlist = _short_repr.maxdict = 8


def show(value) -> str:
    """repr(value) cut to about 100 characters, for quoting a client's value in an error message."""
    return _short_repr.repr(value)


class ProtocolError(ValueError):
    """A request (or response) that breaks the protocol.  `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- BYTES tensors


def encode_bytes(values: Sequence[str | bytes]) -> bytes:
    """BYTES elements in binary form: for each, a 4-byte little-endian length, then the bytes (UTF-8 for str)."""
    parts = []
    for v in values:
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_bytes(buf: bytes | memoryview, count: int, *, name: str) -> list[bytes]:
    """`count` BYTES elements from their binary form; the buffer must hold exactly that many."""
    view = memoryview(buf)
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(view):
            raise ProtocolError(f"input {name!r}: binary data ends inside element {i}'s 4-byte length "
                                f"(shape says {count} elements, binary_data_size is {len(view)})")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise ProtocolError(f"input {name!r}: element {i} declares {n} bytes but only {len(view) - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(view):
        raise ProtocolError(f"input {name!r}: {len(view) - pos} bytes left over after {count} elements; "
                            "binary_data_size must match the shape exactly")
    return out


# ---------------------------------------------------------------- bodies


def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON object, the binary tail) of a request or response body."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {show(header_length)}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    try:
        obj = json.loads(bytes(body[:n]))
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deeply; tensors have a few levels at most") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer literal over 4300 digits
        hint = ""
        if header_length is None and "Extra data" in str(e):
            hint = f"; binary tensor data after the JSON needs the {HEADER_LENGTH} header"
        raise ProtocolError(f"the request's JSON is malformed: {e}{hint}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(obj).__name__}")
    return obj, memoryview(body)[n:]


def binary_parts(tensors: list, tail: memoryview, *, kind: str) -> list[memoryview | None]:
    """Each tensor's slice of the binary tail (None for a tensor sent as JSON); checks the sizes add up."""
    parts, pos = [], 0
    for t in tensors:
        size = parameters(t, kind=kind).get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{kind} {show(t.get('name'))}: parameters.binary_data_size must be an int >= 0, "
                                f"got {show(size)}")
        if pos + size > len(tail):
            raise ProtocolError(f"{kind} {show(t.get('name'))}: binary_data_size {size} runs past the end of the body "
                                f"({len(tail) - pos} binary bytes left)")
        parts.append(tail[pos : pos + size])
        pos += size
    if pos != len(tail):
        raise ProtocolError(f"the body has {len(tail) - pos} binary bytes that no tensor's binary_data_size accounts for")
    return parts


def parameters(tensor: dict, *, kind: str) -> dict:
    """A tensor's `parameters` object ({} if absent); ProtocolError if it is not a JSON object."""
    params = tensor.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{kind} {show(tensor.get('name'))}: 'parameters' must be a JSON object, got {show(params)}")
    return params


def check_shape(shape, *, name: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative ints, got {show(shape)}")
    return shape


def flatten(data, *, name: str) -> list:
    """JSON tensor data, nested or flat, as a flat row-major list."""
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: data must be a JSON list, got {type(data).__name__}")
    if not any(isinstance(x, list) for x in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------- client side


def encode_infer_request(input_name: str, texts: Sequence[str], *, output: str, request_id: str | None = None
                         ) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request with one BYTES input sent as binary, asking for `output` in binary."""
    tail = encode_bytes(texts)
    header = {
        "inputs": [{"name": input_name, "datatype": "BYTES", "shape": [len(texts)],
                    "parameters": {"binary_data_size": len(tail)}}],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    if request_id is not None:
        header["id"] = request_id
    return json.dumps(header, separators=(",", ":")).encode(), tail


def decode_output(body: bytes, header_length: str | None, name: str) -> np.ndarray:
    """Output tensor `name` of an infer response, from JSON data or binary data."""
    obj, tail = split_body(body, header_length)
    outputs = obj.get("outputs")
    if not isinstance(outputs, list):
        raise ProtocolError(f"the response has no 'outputs' list: {str(obj)[:200]}")
    parts = binary_parts(outputs, tail, kind="output")
    for out, part in zip(outputs, parts):
        if out.get("name") != name:
            continue
        datatype, shape = out.get("datatype"), out.get("shape")
        if datatype not in NUMERIC_DTYPES:
            raise ProtocolError(f"output {name!r} has datatype {datatype!r}; expected a numeric type")
        dtype = np.dtype(NUMERIC_DTYPES[datatype])
        if part is not None:
            if len(part) != numel(shape) * dtype.itemsize:
                raise ProtocolError(f"output {name!r}: {len(part)} bytes do not fit shape {shape} of {datatype}")
            return np.frombuffer(part, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        return np.asarray(flatten(out.get("data"), name=name), dtype=dtype).reshape(shape)
    raise ProtocolError(f"the response has no output {name!r}; it has {[o.get('name') for o in outputs]}")
