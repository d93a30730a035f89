"""Named array inputs: their declaration, the checks on a call's rows, and padding rows into a batch.

A model declares, per input name, the shape of one row and its numpy dtype:

    {"pixels": ((8, 8), "float32")}          # fixed shape: a batch is [B, 8, 8]
    {"input_ids": ((None,), "int32")}        # a variable axis (None): a batch is [B, L], L a bucket length
    {"frames": ((None, 64), "float32"), "frame_ids": ((None,), "int32")}   # both share the row's length

At most one axis per input is variable, and every input that has one shares the row's length on it,
so the batch also gets `"mask"` [B, L] int32 (1 = a real position).  Padded positions and filler rows
hold the input's pad value (default 0).  All checks name the row, the input and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

MASK = "mask"  # the batch key of the [B, L] int32 mask; no input may use it
# The other keys of a packed batch (`pack`); no input may use them either.
TOKEN_INDEX, ROW_IDS, POSITIONS = "token_index", "row_ids", "positions"
RESERVED = (MASK, TOKEN_INDEX, ROW_IDS, POSITIONS)

# Per input name: (per-row shape, None marking the variable axis; numpy dtype name).
InputSpec = Mapping[str, tuple[tuple[int | None, ...], str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Input:
    """One declared input.  shape: per row, None on the variable axis; axis: that axis's index or None."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    pad: float | int
    axis: int | None

    def batch_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """[batch, *shape] with the variable axis (if any) set to `length`."""
        return (batch,) + tuple(length if d is None else d for d in self.shape)


def parse(inputs: InputSpec, pad_values: Mapping[str, float | int] | None = None) -> list[Input]:
    """The declared inputs, in declaration order.  Raises ValueError for a reserved name ("mask"), a
    shape with a non-positive size or more than one None, an unknown dtype, or pad values for unknown inputs."""
    if not inputs:
        raise ValueError("inputs is empty; declare at least one, e.g. inputs={'pixels': ((8, 8), 'float32')}")
    pad_values = dict(pad_values or {})
    unknown = sorted(set(pad_values) - set(inputs))
    if unknown:
        raise ValueError(f"pad_values names {unknown}, which are not inputs; inputs are {sorted(inputs)}")
    parsed = []
    for name, spec in inputs.items():
        if name in RESERVED:
            raise ValueError(f"the input name {name!r} is reserved for the engine's batch keys {RESERVED}; "
                             f"rename that input")
        if not (isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[0], tuple | list)):
            raise ValueError(f"input {name!r}: expected (per-row shape, dtype name) such as ((8, 8), 'float32'), "
                             f"got {spec!r}")
        shape, dtype_name = tuple(spec[0]), spec[1]
        if any(d is not None and (not isinstance(d, int | np.integer) or d < 1) for d in shape):
            raise ValueError(f"input {name!r}: shape {shape} must hold positive sizes or None (a variable axis)")
        variable = [k for k, d in enumerate(shape) if d is None]
        if len(variable) > 1:
            raise ValueError(f"input {name!r}: shape {shape} has {len(variable)} variable axes; at most one "
                             f"(None) is allowed per input")
        try:
            dtype = np.dtype(dtype_name)
        except TypeError as e:
            raise ValueError(f"input {name!r}: dtype {dtype_name!r} is not a numpy dtype name; use e.g. "
                             f"'float32' or 'int32'") from e
        parsed.append(Input(name=name, shape=shape, dtype=dtype, pad=pad_values.get(name, 0),
                            axis=variable[0] if variable else None))
    return parsed


def check(specs: Sequence[Input], values: Mapping[str, object], longest: int) -> tuple[dict[str, object], np.ndarray]:
    """Validated rows of one call, and each row's length on the variable axis.

    values: per input, a fixed-shape one as an array [N, *shape] (or N arrays of that shape), a
      variable-axis one as a sequence of N arrays.
    longest: the longest bucket length; a longer row is an error.
    Returns ({name: [N, *shape] array of the declared dtype, or a list of N arrays for a variable
    axis}, lengths [N] int64: all ones when no input has a variable axis).  Raises ValueError naming
    the input (and the row) for a missing or unexpected input, different row counts, no rows, a wrong
    shape, a dtype that does not cast within its kind, an empty or over-long variable axis, or inputs
    whose variable axes disagree.
    """
    names = [s.name for s in specs]
    missing = [name for name in names if name not in values]
    extra = sorted(set(values) - set(names))
    if missing or extra:
        raise ValueError(f"got inputs {sorted(values)}; expected exactly {names} "
                         f"(missing {missing}, unexpected {extra})")
    for name, value in values.items():
        if not hasattr(value, "__len__") or isinstance(value, np.ndarray) and value.ndim == 0:
            raise ValueError(f"input {name!r} is a {type(value).__name__}, not rows; pass an array [N, ...] or a "
                             f"sequence of N arrays")
    counts = {name: len(value) for name, value in values.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"inputs have different row counts {counts}; every input needs one entry per row")
    n = counts[names[0]]
    if n == 0:
        raise ValueError("no rows to run; pass at least one")
    arrays: dict[str, object] = {}
    lengths: np.ndarray | None = None
    first: Input | None = None
    for spec in specs:
        if spec.axis is None:
            arrays[spec.name] = _fixed(spec, values[spec.name])
            continue
        rows, row_lengths = _variable(spec, values[spec.name])
        if lengths is None:
            lengths, first = row_lengths, spec
            if lengths.max() > longest:
                row = int(np.argmax(lengths))
                raise ValueError(
                    f"row {row}: input {spec.name!r} has length {lengths[row]} on its variable axis; the longest "
                    f"bucket is {longest}; truncate it or add a longer bucket")
        elif not np.array_equal(lengths, row_lengths):
            row = int(np.argmax(lengths != row_lengths))
            raise ValueError(
                f"row {row}: input {spec.name!r} has length {row_lengths[row]} on its variable axis but "
                f"{first.name!r} has {lengths[row]}; inputs with a variable axis share the row's length")
        arrays[spec.name] = rows
    return arrays, lengths if lengths is not None else np.ones(n, np.int64)


def pad(specs: Sequence[Input], arrays: Mapping[str, object], rows: np.ndarray, lengths: np.ndarray,
        batch: int, length: int) -> dict[str, np.ndarray]:
    """The batch for `rows` (indices into `arrays`, whose variable-axis lengths are `lengths` [n]):
    every input [batch, ...] and, when an input has a variable axis, "mask" [batch, length] int32.

    Rows past n are filler rows: pad values and an all-zero mask.
    """
    padded: dict[str, np.ndarray] = {}
    if any(s.axis is not None for s in specs):
        mask = np.zeros((batch, length), np.int32)  # [B, L]
        mask[: len(rows)] = np.arange(length)[None, :] < lengths[:, None]
        real = mask.astype(bool)
        padded[MASK] = mask
    for spec in specs:
        buf = np.full(spec.batch_shape(batch, length), spec.pad, spec.dtype)  # [B, *shape]
        value = arrays[spec.name]
        if spec.axis is None:
            buf[: len(rows)] = value[rows]
        elif spec.axis == 0:
            # [B, L, *rest][real] is [sum of lengths, *rest] in row-major order: the rows, concatenated.
            buf[real] = np.concatenate([value[i] for i in rows])
        else:
            for b, i in enumerate(rows):
                buf[(b,) + (slice(None),) * spec.axis + (slice(0, lengths[b]),)] = value[i]
        padded[spec.name] = buf
    return padded


def pack(specs: Sequence[Input], arrays: Mapping[str, object], rows: np.ndarray, lengths: np.ndarray,
         batch: int, length: int, tokens: int) -> dict[str, np.ndarray]:
    """The padding-free batch for `rows` (its keys: `RESERVED`): each variable-axis input as its rows' tokens
    end to end, [tokens, *rest] (pad values after the last real token); each fixed-shape input [batch,
    ...] as in `pad`; "mask" [batch, length] int32; "token_index" [batch, length] int32, the position in
    [tokens] of each row's token, `tokens` (out of range) on padding; "row_ids" [tokens] int32, the row
    (0-based slot) of each token, `batch` (out of range) after the last real one (not the 1-based
    segment ids with 0 for padding of T5X and MaxText); "positions" [tokens] int32, each
    token's position in its row.  Needs every variable axis to be axis 0 (`Engine` checks)."""
    n = len(rows)
    total = int(lengths.sum())
    starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    mask = np.zeros((batch, length), np.int32)  # [B, L]
    mask[:n] = np.arange(length)[None, :] < lengths[:, None]
    token_index = np.full((batch, length), tokens, np.int32)  # [B, L]
    token_index[:n] = np.where(mask[:n], starts[:, None] + np.arange(length)[None, :], tokens)
    row_ids = np.full(tokens, batch, np.int32)  # [T]
    row_ids[:total] = np.repeat(np.arange(n, dtype=np.int32), lengths)
    positions = np.zeros(tokens, np.int32)  # [T]
    positions[:total] = np.arange(total) - np.repeat(starts, lengths)
    packed = {MASK: mask, TOKEN_INDEX: token_index, ROW_IDS: row_ids, POSITIONS: positions}
    for spec in specs:
        value = arrays[spec.name]
        if spec.axis is None:
            buf = np.full(spec.batch_shape(batch, length), spec.pad, spec.dtype)  # [B, *shape]
            buf[:n] = value[rows]
        else:
            buf = np.full((tokens,) + spec.shape[1:], spec.pad, spec.dtype)  # [T, *rest]
            buf[:total] = np.concatenate([value[i] for i in rows])
        packed[spec.name] = buf
    return packed


def _fixed(spec: Input, value) -> np.ndarray:
    """A fixed-shape input as one [N, *shape] array of the declared dtype (no copy when it already is)."""
    if isinstance(value, np.ndarray):
        array = value
        if array.shape[1:] != spec.shape:
            raise ValueError(f"input {spec.name!r} has shape {array.shape}; expected [N, *{spec.shape}] "
                             f"(each row {spec.shape})")
    else:
        rows = [np.asarray(r) for r in value]
        for i, r in enumerate(rows):
            if r.shape != spec.shape:
                raise ValueError(f"row {i}: input {spec.name!r} has shape {r.shape}; expected {spec.shape}")
        array = np.stack(rows)
    _check_dtype(spec, array.dtype, None)
    return array.astype(spec.dtype, copy=False)


def _variable(spec: Input, value) -> tuple[list[np.ndarray], np.ndarray]:
    """A variable-axis input as a list of N arrays, and each row's length on the variable axis [N]."""
    rows = [np.asarray(r) for r in value]  # no copy for arrays
    ndim, axis = len(spec.shape), spec.axis
    lengths = np.fromiter((r.shape[axis] if r.ndim == ndim else -1 for r in rows), np.int64, count=len(rows))
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        if lengths[i] < 0:
            raise ValueError(f"row {i}: input {spec.name!r} has shape {rows[i].shape}; expected {spec.shape} "
                             f"(None: any length)")
        raise ValueError(f"row {i}: input {spec.name!r} is empty on its variable axis; every row needs a length "
                         f"of at least 1")
    if ndim > 1:
        fixed = spec.shape[:axis] + spec.shape[axis + 1:]
        for i, r in enumerate(rows):
            if r.shape[:axis] + r.shape[axis + 1:] != fixed:
                raise ValueError(f"row {i}: input {spec.name!r} has shape {r.shape}; expected {spec.shape} "
                                 f"(None: any length)")
    for dtype in {r.dtype for r in rows}:
        if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
            _check_dtype(spec, dtype, next(i for i, r in enumerate(rows) if r.dtype == dtype))
    return rows, lengths


def _check_dtype(spec: Input, dtype: np.dtype, row: int | None) -> None:
    """Raises ValueError (naming `row` if given) unless `dtype` casts to the declared one within its kind."""
    if not np.can_cast(dtype, spec.dtype, casting="same_kind"):
        where = f"row {row}: " if row is not None else ""
        raise ValueError(f"{where}input {spec.name!r} has dtype {dtype}, which does not cast to the declared "
                         f"{spec.dtype} without changing kind; convert it before running (e.g. round floats to int)")
