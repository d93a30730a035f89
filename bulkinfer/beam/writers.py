"""Output files written atomically: rows written under a temporary name as they arrive, renamed when
the file is complete (so a killed job never leaves a half-written file under a final name).

    writer = ShardWriter(lambda: f"out/part-{uuid.uuid4().hex}.parquet", "parquet", ["id", "embedding"])
    for temp, final, rows in writer.add(batch) + writer.close():
        commit(temp, final)

A writer holds about ROW_GROUP_BYTES of rows in memory, not a file's: a worker's memory does not grow
with the size of its files or of its job (bench/memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam.batch import Batch, escape_surrogates, table_rows, to_json

log = logging.getLogger(__name__)

# Bytes of rows per output file (whatever the row count), and the most a bundle's writers buffer over
# all their files together before they write it out.
BYTES_PER_FILE = 16 << 20
# Bytes of rows a writer buffers before it appends them to its file (one Parquet row group).  Arrow's
# Parquet writer holds a row group's encoded pages, levels and (for dictionary-encoded columns)
# dictionaries while it writes it: about 4x the group's bytes, so a whole 16 MiB file in one group took
# 63 MiB of Arrow memory (bench/memory.py), small groups take a few.
ROW_GROUP_BYTES = 2 << 20


class ShardBuffer:
    """The rows of one output file as they arrive: Arrow tables (kept columnar) and dict rows.

    columns: keep only these (a missing one is all nulls); None keeps every column.

        >>> buf = ShardBuffer(["id", "length"]); buf.add(batch); temp = buf.write_temp(final, "parquet")
    """

    def __init__(self, columns: list[str] | None):
        self.columns = columns
        self._parts: list[pa.Table | list[dict]] = []
        self._rows = 0
        self.nbytes = 0  # about the bytes buffered: Arrow buffers, or an estimate for dict rows

    def __len__(self) -> int:
        return self._rows

    def add(self, batch: Batch) -> None:
        if batch.table is not None:
            part = select_columns(batch.table, self.columns)
        else:
            part = [{c: r.get(c) for c in self.columns} for r in batch.rows] if self.columns else list(batch.rows)
            if self._parts and isinstance(self._parts[-1], list):  # dict rows stay one list, as before tables
                self._parts[-1].extend(part)
                part = None
        if part is not None:
            self._parts.append(part)
        self._rows += len(batch)
        self.nbytes += _nbytes(batch)

    def write_temp(self, final: str, fmt: str) -> str:
        """Writes everything buffered under the temporary name of `final` (see `write_temp`) and empties."""
        return write_temp(final, self.take(fmt), fmt)

    def take(self, fmt: str) -> pa.Table | list[dict]:
        """Everything buffered, emptied out: one table for "parquet", dict rows for "jsonl"."""
        parts, self._parts, self._rows, self.nbytes = self._parts, [], 0, 0
        if all(isinstance(part, list) for part in parts):
            rows = [r for part in parts for r in part]
            return rows_to_table(rows) if fmt == "parquet" else rows
        if fmt != "parquet":
            return [r for part in parts for r in _part_rows(part)]
        tables = [part if isinstance(part, pa.Table) else rows_to_table(part) for part in parts]
        try:
            return pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Columns whose types differ between parts (an id that is text in one file, a number in
            # another): one table from all rows, as rows_to_table makes it for dict rows.
            return rows_to_table([r for part in parts for r in _part_rows(part)])


class ShardWriter:
    """Output files of rows as they arrive, holding about ROW_GROUP_BYTES of them in memory, not a file's.

    Rows are buffered (a `ShardBuffer`) until ROW_GROUP_BYTES, then appended to the open file (a Parquet
    row group, or JSONL lines) under its temporary name.  A file ends at `rows_per_file` rows or
    `bytes_per_file` bytes of rows, or when the next rows' columns cannot be stored under its Parquet
    schema (a column added, or whose type changed: an id that is text in one input file and a number
    in another); the next file then starts.  `add`, `write_buffered` and `close` return the files they
    completed, as (temporary name, final name, rows); `commit` makes each visible.

    new_name: gives the final name of each new file.  columns: as ShardBuffer's.

        >>> writer = ShardWriter(lambda: f"out/part-{uuid.uuid4().hex}.parquet", "parquet", None)
        >>> done = writer.add(batch) + writer.close()
    """

    def __init__(self, new_name, fmt: str, columns: list[str] | None, *, rows_per_file: int = 100_000,
                 bytes_per_file: int = BYTES_PER_FILE):
        if rows_per_file < 1 or bytes_per_file < 1:
            raise ValueError(f"rows_per_file and bytes_per_file must be >= 1, got {rows_per_file} and {bytes_per_file}")
        self._new_name, self._fmt = new_name, fmt
        self._buffer = ShardBuffer(columns)
        self._rows_per_file, self._bytes_per_file = rows_per_file, bytes_per_file
        self._final = self._stream = self._parquet = None  # the open file, if any
        self._rows = self._bytes = 0  # rows and bytes of rows written to the open file

    @property
    def buffered_bytes(self) -> int:
        return self._buffer.nbytes

    def add(self, batch: Batch) -> list[tuple[str, str, int]]:
        """Buffers the batch's rows; writes them out when the buffer or the file is full."""
        self._buffer.add(batch)
        room = min(ROW_GROUP_BYTES, self._bytes_per_file - self._bytes)
        if self._buffer.nbytes >= room or self._rows + len(self._buffer) >= self._rows_per_file:
            return self.write_buffered()
        return []

    def write_buffered(self) -> list[tuple[str, str, int]]:
        """Appends the buffered rows to the open file (starting one if needed); ends the file once full."""
        done = []
        if not len(self._buffer):
            return done
        n, nbytes = len(self._buffer), self._buffer.nbytes
        chunk = self._buffer.take(self._fmt)
        if self._parquet is not None:
            fitted = _conform(chunk, self._parquet.schema)
            if fitted is None:
                done.append(self._end())
            else:
                chunk = fitted
        if self._stream is None:
            self._start(chunk)
        if self._fmt == "parquet":
            self._parquet.write_table(chunk, row_group_size=row_group_rows(chunk))
        else:
            self._stream.write("".join(to_json(r) + "\n" for r in chunk).encode("utf-8"))
        del chunk
        self._rows, self._bytes = self._rows + n, self._bytes + nbytes
        if self._rows >= self._rows_per_file or self._bytes >= self._bytes_per_file:
            done.append(self._end())
        release_memory()
        return done

    def close(self) -> list[tuple[str, str, int]]:
        """Writes what is buffered and ends the open file."""
        done = self.write_buffered()
        if self._stream is not None:
            done.append(self._end())
        return done

    def abort(self) -> None:
        """Drops what is buffered, closes the open file (a Parquet footer may be written) and deletes its
        temporary name: what a DoFn does with a failed bundle's writer (the bundle's rows are retried, so
        a partial file must not outlive it).  A close or delete that fails is logged, never raised, and
        the delete is tried whatever the closes did.  Callable any time."""
        parquet, stream, final = self._parquet, self._stream, self._final
        self._buffer = ShardBuffer(self._buffer.columns)
        self._final = self._stream = self._parquet = None
        self._rows = self._bytes = 0
        if stream is None:
            return
        for step in (parquet.close if parquet is not None else None, stream.close,
                     lambda: FileSystems.delete([temp_name(final)])):
            if step is None:
                continue
            try:
                step()
            except Exception as e:  # noqa: BLE001 -- cleanup of a bundle that already failed for another reason
                log.warning("cleaning up the partial file %s: %s", temp_name(final), e)

    def _start(self, chunk) -> None:
        self._final = self._new_name()
        self._stream = FileSystems.create(temp_name(self._final))
        if self._fmt == "parquet":
            self._parquet = pq.ParquetWriter(self._stream, chunk.schema, use_dictionary=dictionary_columns(chunk.schema))

    def _end(self) -> tuple[str, str, int]:
        if self._parquet is not None:
            self._parquet.close()
        self._stream.close()
        done = (temp_name(self._final), self._final, self._rows)
        self._final = self._stream = self._parquet = None
        self._rows = self._bytes = 0
        return done


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """`table` under `schema` (same columns; a column of nulls takes the schema's type), or None if it
    cannot be stored under it without changing a value."""
    if table.schema.equals(schema):
        return table
    if sorted(table.column_names) != sorted(schema.names):
        return None
    columns = []
    for field in schema:
        column = table.column(field.name)
        if column.type == field.type:
            columns.append(column)
        elif pa.types.is_null(column.type):
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            return None
    return pa.table(columns, schema=schema)


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
            pq.write_table(table, f, row_group_size=row_group_rows(table),
                           use_dictionary=dictionary_columns(table.schema))
            del table
        else:
            rows = table_rows(rows) if isinstance(rows, pa.Table) else rows
            f.write("".join(to_json(r) + "\n" for r in rows).encode("utf-8"))
    del rows
    release_memory()
    return temp


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group of `table`: about ROW_GROUP_BYTES of its data (at least 1 row)."""
    return max(1, ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth Parquet's dictionary encoding: all but floats and lists (vectors) of floats.

    Model outputs (embeddings, probabilities) are floats that rarely repeat; for them the writer builds a
    dictionary page by page only to drop it (and hold it meanwhile).  Ids, labels and texts keep it.
    """
    def numeric(t: pa.DataType) -> bool:
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        return pa.types.is_floating(t)
    return [field.name for field in schema if not numeric(field.type)]


_libc = None


def use_system_memory_pool() -> None:
    """Makes the C library's allocator Arrow's memory pool in this (worker) process, unless the user
    chose one with $ARROW_DEFAULT_MEMORY_POOL.

    Arrow's default pool (mimalloc in the pyarrow wheels) keeps pages freed by other threads resident:
    the Parquet reader decodes in Arrow's thread pool, and `release_unused` collects only the calling
    thread's heap.  At a 200,000-row job's peak its region held 91 MiB resident, ~10 MiB of it live
    (BENCHMARKS.md, "Memory flat in data size").
    Called in the writers' DoFn.setup, before the stage reads or writes anything.
    """
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())


def release_memory() -> None:
    """Returns freed memory to the operating system: Arrow's pool (mimalloc or jemalloc keep freed
    pages for reuse) and glibc's heap (`malloc_trim(0)`; freed blocks below the top of its arenas stay
    resident otherwise).  Called after each file written, so a worker's resident memory is its working
    set, not the high water of every file it wrote.  A no-op where glibc is not the C library."""
    global _libc
    pa.default_memory_pool().release_unused()
    if _libc is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    if _libc:
        _libc.malloc_trim(0)


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
