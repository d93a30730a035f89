"""Prediction-row fields as the evaluate and stats jobs read them: any field as a list, and a vector field
(probabilities [C], an embedding [D]) as one [N, width] array with per-row errors that name the field.

    errors = {}
    probs = vectors(batch, "probs", 10, "float32", errors)   # float32 [N, 10]; errors {row: text}
    ids = column(batch, "id")                                # [N] list, None where missing

Each vector is checked by the model contract's own `TensorSpec` (models/signature.py): an Arrow
fixed-size list column by `TensorSpec.column` (no Python object per row), anything else row by row by
`TensorSpec.check`, so a vector is accepted or refused, with the same words, wherever it is read.
"""

from __future__ import annotations

import numpy as np

from bulkinfer.beam.batch import Batch
from bulkinfer.models.signature import TensorSpec


def column(batch: Batch, field: str) -> list:
    """The field's N values as a Python list (None where missing or null)."""
    table = batch.table
    if table is not None:
        return table.column(field).to_pylist() if field in table.column_names else [None] * len(batch)
    return [row.get(field) for row in batch.rows]


def vectors(batch: Batch, field: str, width: int, dtype: str, errors: dict[int, str], *,
            missing: str = "") -> np.ndarray:
    """Field `field` of every row as [N, width] `dtype` ("float32" or "float64"); writable.

    A row whose value is missing or null, or is not `width` numbers (`TensorSpec.check`: the wrong shape,
    text, a ragged list, values `dtype` cannot hold), gets an error naming the field in `errors`, unless
    it has one already; its row of the result holds zeros.  missing: words added to the error of a
    missing or null value, e.g. "; set --probs-field to the model's probabilities output".
    """
    spec = TensorSpec(field, (width,), dtype)
    n = len(batch)
    absent = f"field {field!r} is missing or null{missing}"
    table = batch.table
    if table is not None and field not in table.column_names:
        for i in range(n):
            errors.setdefault(i, absent)
        return np.zeros((n, width), dtype)
    converted = spec.column(table.column(field), field) if table is not None else None
    if converted is not None:  # a fixed-size list column of numbers: its only bad rows are null ones
        out, nulls = converted  # [N, width]
        out = out if out.flags.writeable else out.copy()
        for i in nulls:
            errors.setdefault(i, absent)
            out[i] = 0
        return out
    out = np.zeros((n, width), dtype)
    for i, value in enumerate(column(batch, field)):
        if value is None:
            errors.setdefault(i, absent)
            continue
        checked, error = spec.check(value, field)
        if error is not None:
            errors.setdefault(i, error)
        else:
            out[i] = checked
    return out
