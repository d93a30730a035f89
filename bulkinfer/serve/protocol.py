"""The Open Inference Protocol (KServe v2) REST wire format, with the binary tensor data extension.

A request or response body is a JSON object, optionally followed by raw tensor bytes.  When raw
bytes follow, the HTTP header `Inference-Header-Content-Length` gives the JSON part's length and
each binary tensor says its byte count in `parameters.binary_data_size`; the tensors' bytes follow
the JSON in the order the tensors are listed.  Numbers are little-endian and row-major; a BYTES
element is a 4-byte little-endian length followed by that many bytes.

    >>> header, tail = encode_infer_request("text", ["a", "b"], output="embedding")
    >>> len(tail)                                  # 2 x (4-byte length + 1 byte)
    10
    >>> tensor, raw = encode_tensor("pixels", "FP32", np.zeros((2, 8, 8), np.float32), binary=True)
    >>> tensor["shape"], len(raw)
    ([2, 8, 8], 512)

The server checks requests against the model's signature (`decode_inputs`: each input's name, datatype
and shape [N, *per-row shape], -1 in the metadata for the batch and a variable axis) and answers every
output with its own datatype (`encode_tensor`).

Only JSON is parsed here (`json.loads`), never pickles.  Both the server and the client use this module.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Sequence

import numpy as np

from bulkinfer.models.signature import TEXT, V2_DATATYPES, TensorSpec

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


# ---------------------------------------------------------------- tensors and the model signature

# v2 datatype -> the dtype name of a `TensorSpec` ("string" for BYTES); the inverse of V2_DATATYPES.
SPEC_DTYPES = {v: k for k, v in V2_DATATYPES.items()}

# What JSON `data` may hold for each kind of datatype (bool is not an int here, as in JSON).
_JSON_KINDS = {"BOOL": ((bool,), "true or false"), "INT": ((int,), "integers"), "UINT": ((int,), "integers"),
               "FP": ((int, float), "numbers"), "BF": ((int, float), "numbers")}


def wire_dtype(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of a numeric datatype's binary elements (BF16: its 16 raw bits)."""
    return np.dtype("<u2") if datatype == "BF16" else np.dtype(NUMERIC_DTYPES[datatype])


def expected_shape(spec: TensorSpec) -> str:
    """The request shape a tensor takes, for error messages: '[N, 8, 8]', '[N, ?]', '[N] (or [N, 1])'."""
    if spec.dtype == TEXT:
        return "[N] (or [N, 1]), one text per row"
    return "[" + ", ".join(["N", *("?" if d is None else str(d) for d in spec.shape)]) + "]"


def _fits(shape: list[int], spec: TensorSpec) -> bool:
    if spec.dtype == TEXT:
        return len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
    return len(shape) == 1 + len(spec.shape) and all(d is None or d == n for d, n in zip(spec.shape, shape[1:]))


def decode_inputs(request: dict, tail: memoryview, specs: Sequence[TensorSpec]) -> tuple[dict[str, np.ndarray | list], int]:
    """An infer request's inputs checked against the model's signature, in the form `predict` takes them.

    Returns ({input name: N rows' values}, N): fixed shapes as arrays [N, *shape] of the spec's dtype
    (bfloat16 as float32), a variable axis as a list of N arrays, text as a list of N str.
    Raises ProtocolError (400) naming the tensor, what was expected and what came: an unknown, missing or
    repeated input, a datatype other than the signature's, a shape that does not match it, data that does
    not fill the shape, JSON elements of the wrong kind, BYTES that are not UTF-8, inputs of unequal rows.
    """
    by_name = {s.name: s for s in specs}
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        s = specs[0]
        shape, data = ("[2]", '["a", "b"]') if s.dtype == TEXT else (expected_shape(s).replace("N", "1"), "[...]")
        raise ProtocolError(f"'inputs' must be a non-empty list of tensors, e.g. "
                            f'[{{"name": "{s.name}", "datatype": "{s.v2_datatype}", "shape": {shape}, "data": {data}}}]')
    parts = binary_parts(inputs, tail, kind="input")
    takes = (f"this model takes one input, {specs[0].name!r}" if len(specs) == 1
             else f"this model takes inputs {[s.name for s in specs]}")
    names = [t.get("name") for t in inputs]
    for name in names:
        if not isinstance(name, str) or name not in by_name:
            raise ProtocolError(f"unknown input {show(name)}; {takes}")
        if names.count(name) > 1:
            raise ProtocolError(f"input {name!r} is given {names.count(name)} times")
    missing = [s.name for s in specs if s.name not in names]
    if missing:
        raise ProtocolError(f"input {missing[0]!r} is missing; {takes}")
    values, rows = {}, None
    for tensor, part in zip(inputs, parts):
        name = tensor["name"]
        values[name], n = decode_tensor(tensor, part, by_name[name])
        if rows is not None and n != rows[1]:
            raise ProtocolError(f"input {name!r} has {n} rows but input {rows[0]!r} has {rows[1]}; "
                                "every input needs one value per row")
        rows = rows or (name, n)
    return values, rows[1]


def decode_tensor(tensor: dict, part: memoryview | None, spec: TensorSpec) -> tuple[np.ndarray | list, int]:
    """(one input's N rows in the form `predict` takes, N); see `decode_inputs`."""
    name, datatype = spec.name, tensor.get("datatype")
    if datatype != spec.v2_datatype:
        raise ProtocolError(f"input {name!r} has datatype {show(datatype)}; expected {spec.v2_datatype!r} "
                            f"({spec.describe()} per row)")
    shape = check_shape(tensor.get("shape"), name=name)
    if not _fits(shape, spec):
        raise ProtocolError(f"input {name!r} has shape {show(shape)}; expected {expected_shape(spec)}")
    count, rows = numel(shape), shape[0]
    if rows and not count:  # only a variable axis can be 0 long; a row needs at least one value (as in `check`)
        raise ProtocolError(f"input {name!r} has shape {show(shape)}; its variable axis must be at least 1 long")
    if spec.dtype == TEXT:
        return _texts(tensor, part, count, name), rows
    if part is not None:
        dtype = wire_dtype(datatype)
        if len(part) != count * dtype.itemsize:
            raise ProtocolError(f"input {name!r}: binary_data_size is {len(part)} bytes but shape {show(shape)} of "
                                f"{datatype} needs {count * dtype.itemsize}")
        array = np.frombuffer(part, dtype=dtype).reshape(shape)
        array = _from_bf16(array) if datatype == "BF16" else array.astype(dtype.newbyteorder("="))
    else:
        if "data" not in tensor:
            raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        flat = flatten(tensor["data"], name=name)
        if len(flat) != count:
            raise ProtocolError(f"input {name!r}: shape {show(shape)} needs {count} elements, data has {len(flat)}")
        array = _json_numbers(flat, datatype, name=name).reshape(shape)
    array = array.astype(np.float32 if spec.dtype == "bfloat16" else spec.dtype, copy=False)  # [N, *shape]
    return (list(array) if spec.variable else array), rows


def _texts(tensor: dict, part: memoryview | None, count: int, name: str) -> list[str]:
    if part is not None:
        raw = decode_bytes(part, count, name=name)
    else:
        if "data" not in tensor:
            raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        raw = flatten(tensor["data"], name=name)
        if len(raw) != count:
            raise ProtocolError(f"input {name!r}: shape {show(tensor['shape'])} needs {count} elements, "
                                f"data has {len(raw)}")
    texts = []
    for i, v in enumerate(raw):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ProtocolError(f"input {name!r} element {i} is not valid UTF-8 ({e})") from None
        elif not isinstance(v, str):
            raise ProtocolError(f"input {name!r} element {i} is {type(v).__name__}; BYTES elements "
                                "in JSON must be strings")
        elif not _is_unicode(v):
            raise ProtocolError(f"input {name!r} element {i} has a lone surrogate escape (like \\ud800), "
                                "which is not Unicode text")
        texts.append(v)
    return texts


def _is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (JSON allows "\\ud800"; UTF-8 and tokenizers do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_numbers(flat: list, datatype: str, *, name: str) -> np.ndarray:
    """Flat JSON elements of a numeric datatype as a numpy array; ProtocolError for a wrong kind or range."""
    kinds, words = next(v for k, v in _JSON_KINDS.items() if datatype.startswith(k))
    for i, x in enumerate(flat):
        if type(x) not in kinds:
            raise ProtocolError(f"input {name!r} element {i} is {show(x)}; {datatype} elements in JSON must be {words}")
    try:
        return np.asarray(flat, dtype=np.float32 if datatype == "BF16" else NUMERIC_DTYPES[datatype])
    except (OverflowError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: a value does not fit {datatype} ({e})") from None


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 raw bits (uint16) -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw bits (uint16), rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def encode_tensor(name: str, datatype: str, values, *, binary: bool, shape: Sequence[int] | None = None
                  ) -> tuple[dict, bytes]:
    """(the tensor's JSON object, its binary bytes or b"") for a request input or a response output.

    values: an array [N, ...] for a numeric datatype (cast to it), a sequence of str/bytes for BYTES.
    shape: the tensor's shape (default: the array's shape, or [N] for BYTES).
    """
    if datatype == "BYTES":
        items = list(values.ravel() if isinstance(values, np.ndarray) else values)
        tensor = {"name": name, "datatype": datatype, "shape": list(shape or [len(items)])}
        if binary:
            raw = encode_bytes(items)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            return tensor, raw
        tensor["data"] = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in items]
        return tensor, b""
    array = np.asarray(values)
    tensor = {"name": name, "datatype": datatype, "shape": list(shape or array.shape)}
    if datatype == "BF16":
        wire = _to_bf16(array.astype(np.float32))
        data = _from_bf16(wire)  # what the bits say, for JSON
    else:
        wire = data = np.ascontiguousarray(array, dtype=NUMERIC_DTYPES[datatype])
    if binary:
        raw = wire.astype(wire_dtype(datatype), copy=False).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    tensor["data"] = data.ravel().tolist()  # float32 -> Python float is exact; repr round-trips
    return tensor, b""


def join(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


# ---------------------------------------------------------------- client side


def encode_request(inputs: Sequence[dict], tail: bytes, outputs: Sequence[str] | None, *,
                   request_id: str | None = None, binary: bool = True) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of an infer request: `inputs` from `encode_tensor`, asking for each of
    `outputs` (None: every output) in binary, or as JSON with binary=False (for a server without the
    binary tensor data extension, which may refuse the parameters that ask for it)."""
    header: dict = {"inputs": list(inputs)}
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} if binary else {"name": o}
                             for o in outputs]
    elif binary:
        header["parameters"] = {"binary_data_output": True}
    if request_id is not None:
        header["id"] = request_id
    return join(header), tail


def encode_infer_request(input_name: str, texts: Sequence[str], *, output: str, request_id: str | None = None
                         ) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request with one BYTES input sent as binary, asking for `output` in binary."""
    tensor, tail = encode_tensor(input_name, "BYTES", texts, binary=True)
    return encode_request([tensor], tail, [output], request_id=request_id)


def decode_outputs(body: bytes, header_length: str | None, names: Sequence[str] | None = None
                   ) -> dict[str, np.ndarray]:
    """The output tensors of an infer response, from JSON or binary data: {name: array of its shape}
    (BYTES as an object array of str).  names: the outputs that must be there (default: all it has)."""
    obj, tail = split_body(body, header_length)
    outputs = obj.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(f"the response has no 'outputs' list: {str(obj)[:200]}")
    parts = binary_parts(outputs, tail, kind="output")
    got = {}
    for out, part in zip(outputs, parts):
        name = out.get("name")
        if names is None or name in names:
            got[name] = _decode_output(out, part, name)
    missing = [n for n in (names or ()) if n not in got]
    if missing:
        raise ProtocolError(f"the response has no output {missing[0]!r}; it has {[o.get('name') for o in outputs]}")
    return got


def _decode_output(out: dict, part: memoryview | None, name) -> np.ndarray:
    datatype, shape = out.get("datatype"), check_shape(out.get("shape"), name=name)
    if datatype == "BYTES":
        if part is not None:
            items = [b.decode("utf-8", errors="replace") for b in decode_bytes(part, numel(shape), name=name)]
        else:
            items = flatten(out.get("data"), name=name)
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    if datatype not in NUMERIC_DTYPES and datatype != "BF16":
        raise ProtocolError(f"output {name!r} has datatype {show(datatype)}; expected a v2 datatype")
    if part is not None:
        dtype = wire_dtype(datatype)
        if len(part) != numel(shape) * dtype.itemsize:
            raise ProtocolError(f"output {name!r}: {len(part)} bytes do not fit shape {shape} of {datatype}")
        array = np.frombuffer(part, dtype=dtype).reshape(shape)
        return _from_bf16(array) if datatype == "BF16" else array.astype(dtype.newbyteorder("="))
    dtype = np.float32 if datatype == "BF16" else np.dtype(NUMERIC_DTYPES[datatype]).newbyteorder("=")
    return np.asarray(flatten(out.get("data"), name=name), dtype=dtype).reshape(shape)


def decode_output(body: bytes, header_length: str | None, name: str) -> np.ndarray:
    """Output tensor `name` of an infer response, from JSON data or binary data."""
    return decode_outputs(body, header_length, [name])[name]
