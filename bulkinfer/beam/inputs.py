"""The model's inputs from a batch of rows: each row checked against the model's signature, the good
rows' values gathered in the form `predict` takes.

    valid, inputs, bad = model_inputs(batch, loaded.inputs, {"text": "text"})
    # valid: row indices sent to the model (None: all); inputs: {"text": [...]}; bad: [(row, error)]

A row without a field, or with a value of the wrong type, shape or dtype, is reported with a reason
naming the field, the expected and the actual shape, so that `BulkInference` makes it a dead letter and
runs the rest.  Arrow batches whose columns are fixed-size lists or fixed-shape tensors of numbers are
converted column by column, with no Python object per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bulkinfer.beam.batch import Batch, missing_ids
from bulkinfer.models.signature import TensorSpec


def model_inputs(batch: Batch, specs: Sequence[TensorSpec], fields: Mapping[str, str], *,
                 id_field: str | None = None,
                 ) -> tuple[list[int] | None, dict[str, np.ndarray | list], list[tuple[int, str]]]:
    """(valid row indices, None meaning all rows; {input name: the valid rows' values}; (row, error) for the rest).

    fields: input name -> the row field it is read from.
    id_field: if given, a row whose id is missing or null is an error too.
    """
    n = len(batch)
    columns: dict[str, np.ndarray | list] = {}
    errors: dict[int, str] = {}
    if id_field is not None:
        error = (f"field {id_field!r} (the id) is missing or null; set id_field (--id-field), "
                 "or allow_missing_ids (--allow-missing-ids)")
        errors.update((i, error) for i in missing_ids(batch, id_field))
    if batch.table is not None:
        table = batch.table
        for spec in specs:
            field = fields[spec.name]
            if field not in table.column_names:
                bad = [(i, errors.get(i, f"field {field!r} is missing")) for i in range(n)]
                return [], {s.name: s.stack([]) for s in specs}, bad
            converted = spec.column(table.column(field), field)
            if converted is None:  # no columnar form: row by row
                values, bad = _check_each(spec, field, table.column(field).to_pylist())
            else:
                values, bad = converted
            columns[spec.name] = values
            for i, error in bad.items():
                errors.setdefault(i, error)
    else:
        rows = batch.rows
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                errors[i] = f"expected a dict row, got {type(row).__name__}"
            elif i not in errors:
                missing = next((fields[s.name] for s in specs if fields[s.name] not in row), None)
                if missing is not None:
                    errors[i] = f"field {missing!r} is missing"
        for spec in specs:
            field = fields[spec.name]
            values, bad = _check_each(spec, field, [row[field] if i not in errors else None
                                                    for i, row in enumerate(rows)], skip=errors)
            columns[spec.name] = values
            for i, error in bad.items():
                errors.setdefault(i, error)
    if not errors:
        return None, {s.name: _stacked(s, columns[s.name]) for s in specs}, []
    valid = [i for i in range(n) if i not in errors]
    inputs = {s.name: _stacked(s, _take(columns[s.name], valid)) for s in specs}
    return valid, inputs, sorted(errors.items())


def _check_each(spec: TensorSpec, field: str, values: list, skip: Mapping[int, str] | None = None
                ) -> tuple[list, dict[int, str]]:
    """Each value checked; (checked values with None for bad rows, {row: error}); rows in `skip` are passed over."""
    out, errors, skip = [], {}, skip or {}
    for i, value in enumerate(values):
        if i in skip:
            out.append(None)
            continue
        checked, error = spec.check(value, field)
        error = error or _unicode_error(checked, field)
        if error is not None:
            errors[i] = error
        out.append(checked)
    return out, errors


def _unicode_error(value, field: str) -> str | None:
    r"""Why a str value is not Unicode text, or None.  A JSON escape such as "\ud800" decodes to a lone
    surrogate, which no tokenizer, UTF-8 writer or Beam coder takes.  (Arrow string columns cannot hold
    one, so only values checked row by row need this.)"""
    if not isinstance(value, str) or value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"field {field!r} holds a lone surrogate U+{ord(value[e.start]):04X} at character {e.start}, "
                "which is not valid Unicode; fix or drop the escape in the input")
    return None


def _take(values: np.ndarray | list, rows: list[int]) -> np.ndarray | list:
    if isinstance(values, np.ndarray):
        return values[np.asarray(rows, np.int64)]
    return [values[i] for i in rows]


def _stacked(spec: TensorSpec, values: np.ndarray | list) -> np.ndarray | list:
    return values if isinstance(values, np.ndarray) else spec.stack(values)
