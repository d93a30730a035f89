"""The element that flows between bulkinfer's stages: a batch of rows, not one row.

Beam's Python runners pay about 100 us per element, so read, infer and write move `Batch`es of
hundreds or thousands of rows.  A user's own row-level DoFn can sit between them: `BulkInference`
and `WriteDataset` accept plain dict rows too (see `Rebatch`), and `Unbatch` turns batches into rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

FAILED = "failed"  # tag of every dead-letter output
NAMESPACE = "bulkinfer"  # of every Beam metric bulkinfer reports


class Batch:
    """A batch of rows: a list of dicts, or an Arrow table (what the Parquet reader yields).

    rows: dict rows, or a `pa.Table` / `pa.RecordBatch` whose columns are kept as they are (columnar
      end to end: read, infer and write never build one Python object per row).  Either way `rows`
      gives dict rows (made once from a table with to_pylist, then cached; vector columns, fixed-size
      lists of numbers, come back as 1-D numpy arrays, as a model's predictions do in dict rows), and
      `table` is the table or None.
    source: the file they came from, if any.  positions: each row's 1-based line or row number in that
      file (for error messages).  unit: the key of the unit of work (a file or a range of one, see
      `bulkinfer.beam.io.Unit`) the rows were read in; stages keep it so that a job's writer can
      commit each unit once its counts reconcile.  from_rows: built from single-row elements, so
      BulkInference hands single rows back.

        >>> Batch([{"id": 1, "text": "a"}]).rows             # [{'id': 1, 'text': 'a'}]
        >>> Batch(pa.table({"id": [1], "text": ["a"]})).table
    """

    def __init__(self, rows: list[dict] | pa.Table | pa.RecordBatch, *, source: str | None = None,
                 positions: Sequence[int] | None = None, unit: str | None = None, from_rows: bool = False):
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        self.table: pa.Table | None = rows if isinstance(rows, pa.Table) else None
        self._rows: list[dict] | None = None if self.table is not None else rows
        self.source = source
        self.positions = positions
        self.unit = unit
        self.from_rows = from_rows

    @property
    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = table_rows(self.table)
        return self._rows

    def __len__(self) -> int:
        return self.table.num_rows if self.table is not None else len(self._rows)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        if (self.source, self.unit, self.from_rows) != (other.source, other.unit, other.from_rows) or (
                _listed(self.positions) != _listed(other.positions)):
            return False
        if self.table is not None and other.table is not None:
            return self.table.equals(other.table)
        return self.rows == other.rows

    def __repr__(self) -> str:
        kind = f"table {self.table.schema.names}" if self.table is not None else "rows"
        return f"Batch({len(self)} {kind}, source={self.source!r}, unit={self.unit!r}, from_rows={self.from_rows})"

    def __getstate__(self) -> dict:  # the cached dict rows of a table do not travel
        state = dict(self.__dict__)
        if self.table is not None:
            state["_rows"] = None
        return state

    def row(self, i: int) -> dict:
        """Row i as a dict (from a table, without making the other rows' dicts)."""
        if self._rows is not None:
            return self._rows[i]
        return table_rows(self.table.slice(i, 1))[0]

    def where(self, i: int) -> str:
        """Where row i came from, for error messages: 'data/a.jsonl line 7' or 'row 3'."""
        return position_text(self.source, self.positions[i] if self.positions is not None else i + 1)

    def take(self, indices: Sequence[int], rows: list[dict] | pa.Table | None = None) -> Batch:
        """A batch of the given rows, keeping their positions.

        rows: replacement rows for those indices (dicts, or a table of len(indices) rows) instead of
        this batch's own.
        """
        idx = np.asarray(indices, np.int64)
        every = len(idx) == len(self) and bool((idx == np.arange(len(idx))).all())  # all rows, in order
        if every:
            positions = self.positions
        elif self.positions is None:
            positions = (idx + 1).tolist()
        else:
            positions = np.asarray(self.positions)[idx].tolist()
        if rows is None:
            if self.table is not None:
                rows = self.table if every else self.table.take(idx)
            else:
                rows = [self._rows[i] for i in idx.tolist()]
        return Batch(rows, source=self.source, positions=positions, unit=self.unit, from_rows=self.from_rows)


def missing_ids(batch: Batch, id_field: str) -> list[int]:
    """Indices of the rows whose `id_field` is missing or null (from a table without per-row Python)."""
    if batch.table is not None:
        if id_field not in batch.table.column_names:
            return list(range(len(batch)))
        column = batch.table.column(id_field)
        return np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist() if column.null_count else []
    return [i for i, row in enumerate(batch.rows) if not isinstance(row, dict) or row.get(id_field) is None]


def _listed(positions: Sequence[int] | None) -> list[int] | None:
    return None if positions is None else list(positions)


def position_text(source: str | None, position: int) -> str:
    """'data/a.jsonl line 7', 'data/b.parquet row 7', or 'row 7' without a source."""
    if not source:
        return f"row {position}"
    unit = "row" if source.lower().endswith(".parquet") else "line"
    return f"{source} {unit} {position}"


def table_rows(table: pa.Table) -> list[dict]:
    """Dict rows of a table; fixed-size lists of numbers (vectors) become 1-D numpy arrays.

    Vector columns go straight to numpy (not through D Python floats per row first)."""
    vectors: dict[str, np.ndarray] = {}
    for name, column in zip(table.column_names, table.columns):
        t = column.type
        if not (pa.types.is_fixed_size_list(t) and (pa.types.is_integer(t.value_type)
                                                  or pa.types.is_floating(t.value_type))):
            continue
        if column.null_count:
            continue  # a null vector has no array form; keep the lists
        combined = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        flat = combined.flatten()  # honours the array's offset
        if flat.null_count:
            continue
        vectors[name] = flat.to_numpy().reshape(len(combined), t.list_size)  # [N, D]
    rest = table.drop_columns(list(vectors)) if vectors else table
    rows = rest.to_pylist() if rest.num_columns else [{} for _ in range(table.num_rows)]
    for name, matrix in vectors.items():
        for row, v in zip(rows, matrix):
            row[name] = v
    order = table.column_names
    if vectors and list(vectors) != order[len(order) - len(vectors):]:  # keep the table's column order
        rows = [{c: row[c] for c in order} for row in rows]
    return rows


def dead_letter(*, stage: str, error: str, record: Any, row_id: Any = None, source: str | None = None,
                position: int | None = None, unit: str | None = None) -> dict:
    """One failed row: where it failed, why, and the raw record as it arrived.

    unit: the key of the unit of work the row was read in (see `Batch`), kept as field "unit" when given.
    Lone surrogates in its text (see `escape_surrogates`) are escaped, so that a dead letter can always
    be encoded: by Beam's coders between stages (UTF-8) and by every writer.
    """
    letter = {"id": row_id, "stage": stage, "error": error, "record": record, "source": source, "position": position}
    if unit is not None:
        letter["unit"] = unit
    return escape_surrogates(letter)


# Lone surrogates: code points U+D800..U+DFFF, which a Python str can hold (JSON's "\ud800" escape decodes
# to one) but UTF-8, Arrow and the tokenizer cannot.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def escape_surrogates(value: Any) -> Any:
    r"""`value` with each lone surrogate in its strings (nested in dicts, lists and tuples too, keys
    included) replaced by the six characters of its escape, e.g. "ok\ud800" -> "ok\\ud800".

    Values without one are returned as they are (the same object); other types are left alone.
    """
    if isinstance(value, str):
        return value if value.isascii() or _SURROGATE.search(value) is None else _SURROGATE.sub(_escape, value)
    if isinstance(value, dict):
        return {escape_surrogates(k): escape_surrogates(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(escape_surrogates(v) for v in value)
    return value


def _escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


# Characters escaped in JSONL output.  U+0085, U+2028 and U+2029: some line readers (Python's
# str.splitlines, JavaScript) take them as line breaks, so escaped, one JSONL record is always one line
# whoever reads it.  Lone surrogates: UTF-8 cannot encode them; escaped, the JSON is valid and decodes
# to the same string.  All of these can only occur inside JSON strings, where the escape means the
# same character.
_ESCAPED = str.maketrans(
    {chr(c): f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029, *range(0xD800, 0xE000))})


def to_json(obj: Any) -> str:
    r"""JSON for rows and dead letters, whatever they hold (numpy arrays become lists, bytes are decoded).

    Non-ASCII text stays readable; only U+0085, U+2028, U+2029 and lone surrogates are escaped (as
    \u0085 ...), so the result always encodes to UTF-8 and `json.loads` gives back the same strings.
    """
    return json.dumps(obj, ensure_ascii=False, default=_json_default).translate(_ESCAPED)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, bytes | bytearray):
        return o.decode("utf-8", errors="replace")
    return str(o)


def in_global_window(value) -> WindowedValue:
    """`value` as an element for `finish_bundle` to emit (it has no input element to take a window from)."""
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


class Rebatch(beam.DoFn):
    """Passes `Batch`es through; gathers single dict rows into batches of up to `rows` rows per bundle."""

    def __init__(self, rows: int = 1024):
        self._size = rows
        self._buf: list[dict] = []

    def start_bundle(self):
        self._buf = []

    def process(self, element):
        if isinstance(element, Batch):
            yield element
            return
        self._buf.append(element)
        if len(self._buf) >= self._size:
            yield Batch(self._buf, from_rows=True)
            self._buf = []

    def finish_bundle(self):
        if self._buf:
            yield in_global_window(Batch(self._buf, from_rows=True))
            self._buf = []


class Unbatch(beam.PTransform):
    """Batches -> single rows, for a row-level DoFn of the user's."""

    def expand(self, pcoll):
        return pcoll | beam.FlatMap(_rows_of)


def _rows_of(element) -> list:
    if isinstance(element, Batch):
        return element.rows
    return [element]
