"""The model contract: what every model family provides, so that batching, devices, dead letters,
serving and metrics are written once (STYLE #3, after Beam's ModelHandler).

A model **spec** (`TextEmbedder`, `JaxModel`, `RemoteModel`) is small, frozen, hashable and picklable:
what to load, never loaded weights.  It has `name` and `load()`, and may declare `input_signature` (the
loaded model's `inputs`, known before loading); `load()` runs on the worker, once per process, and
returns a **loaded model**:

    loaded.name: str
    loaded.inputs: tuple[TensorSpec, ...]    what one row provides (the row field is the input's name)
    loaded.outputs: tuple[TensorSpec, ...]   what one row gets back
    loaded.load_s: float                     seconds `load()` took
    loaded.predict(inputs: Mapping[str, np.ndarray | list], stats=None) -> dict[str, np.ndarray]
        inputs: for each input, N rows' values as `TensorSpec.check` returns them: an array
          [N, *shape] for a fixed shape, a list of N arrays for a variable axis, a list of N str for text.
        returns: for each output, an array [N, *shape], in input order.
        raises: `errors.ModelUnavailable` when the model cannot be reached (not the rows' fault); any other
          exception is taken as the fault of some rows, which the caller finds by bisection.
        stats: an `runtime.EngineStats` to add the call's counts to (batches, padding, compiles).

    >>> spec = TensorSpec("pixels", (8, 8), "float32")
    >>> value, error = spec.check([[0] * 8] * 8)       # (float32 [8, 8] array, None)
    >>> spec.check([1, 2, 3])[1]
    "field 'pixels' has shape [3], expected [8, 8] (or 64 numbers, row-major)"
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

TEXT = "string"  # the dtype of a text input or output (a v2 BYTES tensor)
KEY = "key"  # a row's identity: a string or an integer, taken as its str() (a v2 BYTES tensor)

# numpy dtype name -> Open Inference Protocol (KServe v2) datatype
V2_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64", KEY: "BYTES", TEXT: "BYTES",
}  # BYTES comes back from a server's metadata as text (the last entry wins when inverted)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature, per row.

    name: the input's row field, or the output's.  shape: per-row shape; `None` marks one variable axis
    (a token sequence, say), e.g. `(None,)`.  dtype: a numpy dtype name, or "string" for text.

    Raises ValueError for an unknown dtype or more than one variable axis.
    """

    name: str
    shape: tuple[int | None, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        if not self.name:
            raise ValueError("a tensor needs a name")
        if self.dtype not in V2_DATATYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not supported; "
                             f"expected one of {sorted(V2_DATATYPES)}")
        if sum(d is None for d in self.shape) > 1 or any(d is not None and d < 1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape} must hold positive sizes and at most one None")
        if self.dtype == KEY and self.shape:
            raise ValueError(f"tensor {self.name!r}: a key tensor holds one value per row (shape ())")

    @property
    def variable(self) -> bool:
        """True if one axis has no fixed size."""
        return None in self.shape

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPES[self.dtype]

    def v2_shape(self) -> list[int]:
        """The batch's v2 shape: [-1, *shape] with -1 for the batch and any variable axis."""
        return [-1] + [-1 if d is None else d for d in self.shape]

    def describe(self) -> str:
        """'float32[8, 8]', 'int32[?]', 'a string'."""
        if self.dtype == TEXT:
            return "a string" if not self.shape else f"strings[{', '.join(map(str, self.shape))}]"
        if self.dtype == KEY:
            return "a string or an integer"
        return f"{self.dtype}[{', '.join('?' if d is None else str(d) for d in self.shape)}]"

    def check(self, value, field: str | None = None) -> tuple[object, str | None]:
        """(the value in the model's form, None), or (None, an error naming the field, expected and actual).

        Numbers may come as nested lists or numpy arrays; a fixed shape also takes its number of values
        flat (row-major).  Integers are taken where floats are expected, never the other way round.
        field: the row field named in errors (default: the tensor's name).
        """
        field = field or self.name
        if self.dtype == KEY:
            if isinstance(value, str) or (isinstance(value, int | np.integer) and not isinstance(value, bool)):
                return str(value), None
            return None, f"field {field!r} is {_kind(value)}, expected a string or an integer"
        if self.dtype == TEXT and not self.shape:
            if isinstance(value, str):
                return value, None
            return None, f"field {field!r} is {_kind(value)}, expected a string"
        if self.dtype == TEXT:
            return None, f"field {field!r}: {self.describe()} is an output only"
        if value is None or isinstance(value, str | bytes | dict):
            return None, f"field {field!r} is {_kind(value)}, expected {self.describe()}"
        try:
            array = np.asarray(value)
        except ValueError:  # a ragged nested list
            return None, f"field {field!r} is a ragged nested list, expected {self.describe()}"
        if array.dtype.kind not in "biuf":
            return None, f"field {field!r} holds {_kind_of_array(array)}, expected {self.describe()}"
        target = np.dtype(self.dtype) if self.dtype != "bfloat16" else np.dtype(np.float32)
        if array.size == 0:
            return None, f"field {field!r} is empty, expected {self.describe()}"
        if not np.can_cast(array.dtype, target, casting="same_kind") or (array.dtype.kind == "b") != (target.kind == "b"):
            return None, f"field {field!r} holds {array.dtype} values, expected {self.dtype}"
        if not _fits(array, target):
            return None, (f"field {field!r} holds values from {array.min()} to {array.max()}, outside what "
                          f"{self.dtype} holds")
        shaped = self._shaped(array)
        if shaped is None:
            hint = f" (or {self.size} numbers, row-major)" if not self.variable and len(self.shape) > 1 else ""
            return None, (f"field {field!r} has shape {list(array.shape)}, expected "
                          f"{self.describe()[len(self.dtype):]}{hint}")
        return shaped.astype(target, copy=False), None

    def empty(self) -> np.ndarray | list:
        """Zero rows of this tensor: an array [0, *shape] (a variable axis 0 long); bfloat16 as float32,
        text as an object array."""
        dtype = {TEXT: object, KEY: object, "bfloat16": np.float32}.get(self.dtype, self.dtype)
        return np.zeros((0, *(d or 0 for d in self.shape)), dtype)

    @property
    def size(self) -> int:
        """Values per row of a fixed shape."""
        return math.prod(self.shape)

    def _shaped(self, array: np.ndarray) -> np.ndarray | None:
        if self.variable:
            if array.ndim != len(self.shape) or any(
                    d is not None and d != n for d, n in zip(self.shape, array.shape)):
                return None
            return array
        if array.shape == self.shape:
            return array
        if array.ndim == 1 and array.size == self.size:
            return array.reshape(self.shape)
        return None

    def stack(self, values: list) -> np.ndarray | list:
        """Checked values of N rows in the form `predict` takes: [N, *shape] array, or the list itself."""
        if self.dtype in (TEXT, KEY) or self.variable:
            return values
        target = np.dtype(self.dtype) if self.dtype != "bfloat16" else np.dtype(np.float32)
        if not values:
            return np.zeros((0, *self.shape), target)
        return np.stack(values)

    def column(self, column: pa.ChunkedArray | pa.Array, field: str | None = None
               ) -> tuple[np.ndarray | list, dict[int, str]] | None:
        """An Arrow column's N rows in the form `predict` takes, with no Python object per row where the
        column is a fixed-size list (nested) or a fixed-shape tensor of numbers.

        Returns (values of all N rows, {row index: error} for the rows that cannot be used; their values
        are placeholders), or None when the column's layout needs `check` row by row (lists of varying
        length, nulls inside a row).
        """
        field = field or self.name
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        n = len(column)
        nulls = (np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist() if column.null_count
                 else [])
        errors = {i: f"field {field!r} is null, expected {self.describe()}" for i in nulls}
        if self.dtype == TEXT:
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                return None
            return column.to_pylist(), errors
        if self.dtype == KEY:
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                    or pa.types.is_integer(column.type)):
                return None
            return [None if v is None else str(v) for v in column.to_pylist()], errors
        dense = None if self.variable else _dense(column)
        if dense is None:
            return None
        target = np.dtype(self.dtype) if self.dtype != "bfloat16" else np.dtype(np.float32)
        if (dense.shape[1] != self.size or not np.can_cast(dense.dtype, target, casting="same_kind")
                or not _fits(dense, target)):
            return None  # some rows are wrong: `check` names the shape, dtype or range row by row
        return dense.reshape((n, *self.shape)).astype(target, copy=False), errors  # [N, *shape]


def _dense(column: pa.Array) -> np.ndarray | None:
    """[N, prod(dims)] numbers of a fixed-size list column (nested) or fixed-shape tensor column; null rows
    hold whatever their slots hold.  None for any other layout, or nulls inside rows."""
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    inner, size = storage, 1
    while pa.types.is_fixed_size_list(inner.type):
        child = inner.values.slice(inner.offset * inner.type.list_size, len(inner) * inner.type.list_size)
        size *= inner.type.list_size
        inner = child
    if inner is storage or inner.null_count or not (pa.types.is_integer(inner.type) or pa.types.is_floating(inner.type)):
        return None
    return inner.to_numpy(zero_copy_only=False).reshape(len(storage), size)


def _fits(array: np.ndarray, target: np.dtype) -> bool:
    """True if casting `array` to `target` keeps every value: no integer wraps around, no finite float
    becomes infinite (a narrower float only rounds)."""
    if np.can_cast(array.dtype, target, casting="safe") or array.size == 0:
        return True
    if target.kind in "iu":
        info = np.iinfo(target)
        return bool(array.min() >= info.min and array.max() <= info.max)
    if target.kind == "f":
        finite = np.isfinite(array)
        with np.errstate(over="ignore"):  # the overflow is the answer, not a warning
            return bool(np.isfinite(array.astype(target)[finite]).all())
    return True


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _kind_of_array(array: np.ndarray) -> str:
    return "text" if array.dtype.kind in "US" else f"{array.dtype} values"


def signature(inputs: Mapping[str, tuple[Sequence[int | None], str]]) -> tuple[TensorSpec, ...]:
    """TensorSpecs from `{"pixels": ((8, 8), "float32")}`; raises ValueError naming a malformed entry."""
    specs = []
    for name, entry in inputs.items():
        shape, dtype = entry if isinstance(entry, tuple | list) and len(entry) == 2 else (None, None)
        if not (isinstance(shape, tuple | list) and all(d is None or isinstance(d, int) for d in shape)
                and isinstance(dtype, str | type | np.dtype)):
            raise ValueError(f"input {name!r}: expected (shape, dtype), e.g. ((8, 8), 'float32'), got {entry!r}")
        if dtype not in (TEXT, KEY, "bfloat16"):
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                raise ValueError(f"input {name!r}: {dtype!r} is not a dtype; expected one of "
                                 f"{sorted(V2_DATATYPES)}") from None
        specs.append(TensorSpec(name, tuple(shape), dtype))
    if not specs:
        raise ValueError("a model needs at least one input")
    return tuple(specs)
