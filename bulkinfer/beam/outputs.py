"""Predictions joined back to their rows: dict rows get fields, Arrow tables columns (no per-row Python).

    kept, failed = attach(batch, valid, preds, errors, offset, {"embedding": "embedding"}, keep=None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import Batch


def attach(batch: Batch, valid: list[int] | None, preds: Mapping[str, np.ndarray] | None, errors: dict[int, str],
           offset: int, fields: Mapping[str, str], keep: Sequence[str] | None = None,
           ) -> tuple[Batch, list[tuple[int, str]]]:
    """The batch's predicted rows with one field per model output, and (row index, error) for rows the model failed.

    valid: the batch's rows that were sent to the model (None: all), in order; their predictions are
      preds[name][offset : offset + len(valid)], and `errors` holds the failures by that same index.
    fields: model output name -> the row field it is written to.
    keep: the input fields the output rows keep (missing ones as null); None keeps every field.
    """
    rows = np.arange(len(batch)) if valid is None else np.asarray(valid, np.int64)  # [n]
    ok = np.ones(len(rows), bool)
    failed = []
    for j in (j for j in errors if offset <= j < offset + len(rows)):
        ok[j - offset] = False
        failed.append((int(rows[j - offset]), f"model failed: {errors[j]}"))
    rows = rows[ok]
    if len(rows) == 0:
        return batch.take([]), failed
    every = bool(ok.all())  # then a slice (a view), not a copy of the rows' predictions
    mine = {fields[name]: p[offset:offset + len(ok)] if every else p[offset:offset + len(ok)][ok]
            for name, p in preds.items()}  # field -> [kept, ...]
    if batch.table is None:
        out = []
        for k, i in enumerate(rows.tolist()):
            row = batch.rows[i]
            row = dict(row) if keep is None else {f: row.get(f) for f in keep}
            row.update((f, p[k]) for f, p in mine.items())
            out.append(row)
        return batch.take(rows, out), failed
    table = batch.take(rows).table
    if keep is not None:
        names = set(table.column_names)
        table = pa.table({f: table.column(f) if f in names else pa.nulls(table.num_rows) for f in keep})
    for f, p in mine.items():
        column = arrow_column(p)
        if f in table.column_names:
            table = table.set_column(table.column_names.index(f), f, column)
        else:
            table = table.append_column(f, column)
    return batch.take(rows, table), failed


def absent_fields(batch: Batch, fields: Sequence[str]) -> list[str]:
    """The fields in no row of the batch (a table's missing columns; for dict rows, a field no row has):
    kept fields written as null throughout, most likely a misspelt name."""
    if not fields:
        return []
    if batch.table is not None:
        return [f for f in fields if f not in batch.table.column_names]
    seen = set().union(*(row.keys() for row in batch.rows if isinstance(row, dict)))
    return [f for f in fields if f not in seen]


def arrow_column(preds: np.ndarray) -> pa.Array:
    """[N] -> a plain column; [N, D] -> fixed-size lists of D (nested for more dimensions); no per-row Python."""
    column = pa.array(preds.reshape(-1) if preds.ndim > 1 else preds)
    for size in reversed(preds.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column
