"""Predictions joined back to their rows: dict rows get a field, Arrow tables a column (no per-row Python).

    kept, failed = attach(batch, valid, preds, errors, offset, "embedding")
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import Batch


def attach(batch: Batch, valid: list[int] | None, preds: np.ndarray, errors: dict[int, str], offset: int,
           output: str) -> tuple[Batch, list[tuple[int, str]]]:
    """The batch's predicted rows with field `output` added, and (row index, error) for rows the model failed.

    valid: the batch's rows that were sent to the model (None: all), in order; their predictions are
      preds[offset : offset + len(valid)], and errors holds the failures by that same index.
    """
    keep = np.arange(len(batch)) if valid is None else np.asarray(valid, np.int64)  # [n]
    ok = np.ones(len(keep), bool)
    failed = []
    for j in (j for j in errors if offset <= j < offset + len(keep)):
        ok[j - offset] = False
        failed.append((int(keep[j - offset]), f"model failed: {errors[j]}"))
    mine = preds[offset:offset + len(keep)][ok] if preds is not None else None  # [kept, ...]
    keep = keep[ok]
    if len(keep) == 0:
        return batch.take([]), failed
    if batch.table is None:
        rows = [{**batch.rows[i], output: p} for i, p in zip(keep.tolist(), mine)]
        return batch.take(keep, rows), failed
    table = batch.take(keep).table
    column = arrow_column(mine)
    if output in table.column_names:
        table = table.set_column(table.column_names.index(output), output, column)
    else:
        table = table.append_column(output, column)
    return batch.take(keep, table), failed


def arrow_column(preds: np.ndarray) -> pa.Array:
    """[N] -> a plain column; [N, D] -> fixed-size lists of D (nested for more dimensions); no per-row Python."""
    column = pa.array(preds.reshape(-1) if preds.ndim > 1 else preds)
    for size in reversed(preds.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column
