"""Output files written atomically: rows buffered per file, written under a temporary name, renamed
when complete (so a killed job never leaves a half-written file under a final name).

    buf = ShardBuffer(["id", "embedding"]); buf.add(batch)
    commit(buf.write_temp(final, "parquet"), final)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam.batch import Batch, escape_surrogates, table_rows, to_json

# Bytes of rows a writer holds in memory before it writes them out as one file, whatever the row count:
# a job's memory must not grow with its size (bench/memory.py: 100,000 buffered MiniLM rows were 150 MB).
BYTES_PER_FILE = 16 << 20


class ShardBuffer:
    """The rows of one output file as they arrive: Arrow tables (kept columnar) and dict rows.

    columns: keep only these (a missing one is all nulls); None keeps every column.

        >>> buf = ShardBuffer(["id", "length"]); buf.add(batch); temp = buf.write_temp(final, "parquet")
    """

    def __init__(self, columns: list[str] | None):
        self._columns = columns
        self._parts: list[pa.Table | list[dict]] = []
        self._rows = 0
        self.nbytes = 0  # about the bytes buffered: Arrow buffers, or an estimate for dict rows

    def __len__(self) -> int:
        return self._rows

    def add(self, batch: Batch) -> None:
        if batch.table is not None:
            part = select_columns(batch.table, self._columns)
        else:
            part = [{c: r.get(c) for c in self._columns} for r in batch.rows] if self._columns else list(batch.rows)
            if self._parts and isinstance(self._parts[-1], list):  # dict rows stay one list, as before tables
                self._parts[-1].extend(part)
                part = None
        if part is not None:
            self._parts.append(part)
        self._rows += len(batch)
        self.nbytes += _nbytes(batch)

    def write_temp(self, final: str, fmt: str) -> str:
        """Writes everything buffered under the temporary name of `final` (see `write_temp`) and empties."""
        parts, self._parts, self._rows, self.nbytes = self._parts, [], 0, 0
        if all(isinstance(part, list) for part in parts):
            return write_temp(final, [r for part in parts for r in part], fmt)
        if fmt != "parquet":
            return write_temp(final, [r for part in parts for r in _part_rows(part)], fmt)
        tables = [part if isinstance(part, pa.Table) else rows_to_table(part) for part in parts]
        try:
            table = pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Columns whose types differ between parts (an id that is text in one file, a number in
            # another): one table from all rows, as rows_to_table makes it for dict rows.
            table = rows_to_table([r for part in parts for r in _part_rows(part)])
        return write_temp(final, table, fmt)


def _nbytes(batch: Batch) -> int:
    """The batch's size in memory: its Arrow buffers, or for dict rows its first row's values (arrays,
    strings, ~8 bytes for other values, plus Python's per-field overhead) times its rows."""
    if batch.table is not None:
        return batch.table.nbytes
    if not len(batch):
        return 0
    first = batch.rows[0]
    row = sum(v.nbytes if isinstance(v, np.ndarray) else len(v) if isinstance(v, str | bytes) else 8
              for v in first.values()) + 64 * len(first)
    return row * len(batch)


def _part_rows(part: pa.Table | list[dict]) -> list[dict]:
    return table_rows(part) if isinstance(part, pa.Table) else part


def select_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """These columns of a table, in this order, a missing one as nulls (all columns if None), no metadata."""
    if columns is None:
        return table.replace_schema_metadata(None)
    names = set(table.column_names)
    return pa.table({c: table.column(c) if c in names else pa.nulls(table.num_rows) for c in columns})


def ensure_dir(path: str) -> None:
    """Creates a directory on any Beam filesystem; one that already exists is fine."""
    try:
        FileSystems.mkdirs(path)
    except OSError:
        if not FileSystems.exists(path):
            raise


def temp_name(final: str) -> str:
    """Where `final` is written before it is complete: a hidden name in the same directory."""
    directory, name = final.rsplit("/", 1)
    return f"{directory}/.tmp-{name}"


def write_temp(final: str, rows: list[dict] | pa.Table, fmt: str) -> str:
    """Writes rows (dicts or a table) under the temporary name of `final`; returns that name.  `commit`
    makes it visible."""
    temp = temp_name(final)
    with FileSystems.create(temp) as f:
        if fmt == "parquet":
            table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
            pq.write_table(table, f, use_dictionary=_dictionary_columns(table))
        else:
            rows = table_rows(rows) if isinstance(rows, pa.Table) else rows
            f.write("".join(to_json(r) + "\n" for r in rows).encode("utf-8"))
    return temp


def _dictionary_columns(table: pa.Table) -> list[str]:
    """The columns worth dictionary-encoding: all but vectors (fixed-size lists), whose floats rarely repeat,
    so Parquet's dictionary would only be built and then dropped (bench/host.py: about 40% of the write's CPU)."""
    return [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]


def commit(temp: str, final: str) -> None:
    """Renames a complete temporary file to its final name (atomic on local and HDFS-like filesystems)."""
    FileSystems.rename([temp], [final])


def rows_to_table(rows: list[dict]) -> pa.Table:
    r"""An Arrow table from dict rows; equal-length 1-D numpy vectors become fixed-size float lists.

    Arrow strings are UTF-8: a lone surrogate (JSON's "\ud800" decodes to one) is stored as the six
    characters of its escape, `\ud800`, in a column that keeps its type (in column names too).
    """
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        first = values[0]
        if isinstance(first, np.ndarray) and first.ndim == 1 and all(
                isinstance(v, np.ndarray) and v.shape == first.shape for v in values):
            flat = pa.array(np.stack(values).reshape(-1))
            columns[escape_surrogates(name)] = pa.FixedSizeListArray.from_arrays(flat, first.shape[0])
        else:
            columns[escape_surrogates(name)] = _column([v.tolist() if isinstance(v, np.ndarray) else v
                                                        for v in values])
    return pa.table(columns)


def _column(values: list) -> pa.Array:
    """One Arrow column of Python values, whatever they hold (see `rows_to_table`)."""
    try:
        return pa.array(values)
    except UnicodeEncodeError:  # a lone surrogate; its escape has none, so this recursion ends
        return _column(escape_surrogates(values))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # Mixed types in one column (an id that is sometimes a number, sometimes a string): keep
        # every value, as text (strings as they are, anything else as JSON).
        return pa.array([v if v is None else escape_surrogates(v) if isinstance(v, str) else to_json(v)
                         for v in values], pa.string())
