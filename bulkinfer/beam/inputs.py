"""The model's input from a batch of rows: each row checked, the valid ones' values gathered.

    valid, values, bad = row_inputs(batch, "text", str)   # bad: [(row index, error)] -> dead letters

A row without the field, or with a value of the wrong type, is reported with a reason that names the
field, so that `BulkInference` can make it a dead letter and run the rest.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import Batch


def row_inputs(batch: Batch, field: str, input_type: type) -> tuple[list[int] | None, list, list[tuple[int, str]]]:
    """(valid row indices, None meaning all rows; their values; (row index, error) for the others)."""
    if batch.table is not None:
        return _table_inputs(batch.table, field, input_type)
    valid, values, bad = [], [], []
    for i, row in enumerate(batch.rows):
        error = _row_error(row, field, input_type)
        if error is None:
            valid.append(i)
            values.append(row[field])
        else:
            bad.append((i, error))
    return (None if len(valid) == len(batch) else valid), values, bad


def _row_error(row, field: str, input_type: type) -> str | None:
    if not isinstance(row, dict):
        return f"expected a dict row, got {type(row).__name__}"
    if field not in row:
        return f"field {field!r} is missing"
    return _type_error(row[field], field, input_type)


def _type_error(value, field: str, input_type: type) -> str | None:
    if isinstance(value, input_type):
        return None
    got = "null" if value is None else type(value).__name__
    return f"field {field!r} is {got}, expected {input_type.__name__}"


def _table_inputs(table: pa.Table, field: str, input_type: type):
    if field not in table.column_names:
        return [], [], [(i, f"field {field!r} is missing") for i in range(table.num_rows)]
    column = table.column(field)
    values = column.to_pylist()  # the model's input: one Python object per row is unavoidable
    if input_type is str and _is_text(column.type):
        if not column.null_count:
            return None, values, []
        bad = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist()
    else:
        bad = [i for i, v in enumerate(values) if _type_error(v, field, input_type) is not None]
    if not bad:
        return None, values, []
    ok = np.ones(table.num_rows, bool)
    ok[bad] = False
    valid = np.flatnonzero(ok).tolist()
    return valid, [values[i] for i in valid], [(i, _type_error(values[i], field, input_type)) for i in bad]


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
