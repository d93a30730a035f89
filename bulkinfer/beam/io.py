"""Datasets in and out: JSONL, Parquet and CSV by file extension, on any Beam filesystem.

    >>> rows = p | ReadDataset("data/*.jsonl")                 # PCollection of Batch
    >>> rows | WriteDataset("out/", format="parquet")          # out/part-<uuid>.parquet

Both move `Batch`es of rows, not single rows.  A line or record that cannot be read (malformed JSON,
invalid UTF-8, a CSV row with the wrong column count) is a dead letter naming the file and line; by
default it fails the job, after `.with_exception_handling()` it is returned as a second output.
Files are written to a temporary name and renamed when complete, so a killed job never leaves a
half-written file that looks finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from bulkinfer.beam.batch import (
    FAILED,
    NAMESPACE,
    Batch,
    SourceDone,
    dead_letter,
    escape_surrogates,
    position_text,
    table_rows,
    to_json,
)

READ_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
WRITE_FORMATS = ("parquet", "jsonl")


def input_format(path: str) -> str:
    for ext, fmt in READ_FORMATS.items():
        if path.lower().endswith(ext):
            return fmt
    raise ValueError(f"{path}: unknown input format; expected one of the extensions {sorted(READ_FORMATS)}")


def absolute(pattern: str) -> str:
    """A local path or glob made absolute (one spelling per file, so a resumed job knows its inputs);
    other filesystems' URLs as they are."""
    return pattern if "://" in pattern else os.path.abspath(pattern)


def match_files(pattern: str) -> list[str]:
    """Every file matching a glob on any Beam filesystem, sorted; a clear error if there is none."""
    matched = FileSystems.match([absolute(pattern)])[0].metadata_list
    files = sorted(m.path for m in matched if not m.path.endswith("/"))
    if not files:
        raise FileNotFoundError(f"no input file matches {pattern!r}")
    for f in files:
        input_format(f)
    return files


def estimate_rows(files: list[str]) -> int | None:
    """Rows in the files if cheap to know (Parquet metadata, newline counts of local files), else None."""
    total = 0
    for path in files:
        fmt = input_format(path)
        if fmt == "parquet":
            with FileSystems.open(path) as f:
                try:
                    total += pq.ParquetFile(f).metadata.num_rows
                except (pa.ArrowInvalid, OSError):
                    return None
        elif "://" in path:
            return None
        else:
            with open(path, "rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            total -= 1 if fmt == "csv" else 0
    return total


class ReadDataset(beam.PTransform):
    """Rows of every file matching `pattern`, as `Batch`es of up to `batch_rows` rows.

    files: read exactly these files instead of matching the pattern (e.g. those a resumed job has left).
    markers: after each file's rows, emit a `SourceDone` (for per-file commits; see shards.py).
    """

    def __init__(self, pattern: str, *, batch_rows: int = 1024, files: list[str] | None = None,
                 markers: bool = False):
        super().__init__()
        self._files = match_files(pattern) if files is None else list(files)
        self._batch_rows = batch_rows
        self._markers = markers
        self._dead_letters = False

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def with_exception_handling(self) -> ReadDataset:
        """Return (batches, dead_letters) instead of failing on an unreadable record."""
        self._dead_letters = True
        return self

    def expand(self, pbegin):
        result = (
            pbegin
            # Create reshuffles (reshuffle=True, its default) when there are two files or more, which
            # spreads them over workers; a second Reshuffle here only added a stage to every job.
            | "Files" >> beam.Create(self._files)
            | "Read" >> beam.ParDo(_ReadFile(self._batch_rows, self._markers)).with_outputs(FAILED, main="rows")
        )
        if self._dead_letters:
            return result.rows, result[FAILED]
        _ = result[FAILED] | "FailOnDeadLetter" >> beam.Map(_fail)
        return result.rows


def _fail(letter):
    raise ValueError(f"{letter['error']}; use ReadDataset(...).with_exception_handling() to skip such records")


class _ReadFile(beam.DoFn):
    def __init__(self, batch_rows: int, markers: bool):
        self._batch_rows = batch_rows
        self._markers = markers
        self._rows = Metrics.counter(NAMESPACE, "read_rows")
        self._failed = Metrics.counter(NAMESPACE, "read_rows_failed")

    def process(self, path: str):
        fmt = input_format(path)
        parts = _parquet_parts(path, self._batch_rows) if fmt == "parquet" else self._dict_parts(path, fmt)
        letters = []
        n_rows = 0
        for part in parts:
            if isinstance(part, Batch):
                n_rows += len(part)
                self._rows.inc(len(part))
                yield part
                continue
            position, error, raw = part
            self._failed.inc()
            letters.append(dead_letter(
                stage="read", error=f"{position_text(path, position)}: {error}", record=raw, source=path, position=position))
            yield beam.pvalue.TaggedOutput(FAILED, letters[-1])
        if self._markers:
            yield SourceDone(path, rows=n_rows, failed=len(letters), letters=tuple(letters))

    def _dict_parts(self, path: str, fmt: str):
        """Batches of dict rows, and (position, error, raw record) for each unreadable record."""
        reader = {"jsonl": _jsonl_records, "csv": _csv_records}[fmt]
        rows, positions = [], []
        for position, row, error, raw in reader(path):
            if error is not None:
                yield position, error, raw
                continue
            rows.append(row)
            positions.append(position)
            if len(rows) >= self._batch_rows:
                yield Batch(rows, source=path, positions=positions)
                rows, positions = [], []
        if rows:
            yield Batch(rows, source=path, positions=positions)


# Each dict-row reader yields (1-based line/row number, row or None, error or None, raw record).


def _jsonl_records(path: str):
    with FileSystems.open(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"invalid UTF-8 at byte {e.start}", raw.decode("utf-8", errors="replace")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"malformed JSON ({e.msg} at character {e.pos})", line.rstrip("\n")
                continue
            if not isinstance(row, dict):
                yield n, None, f"expected a JSON object, got {type(row).__name__}", line.rstrip("\n")
                continue
            yield n, row, None, None


def _csv_records(path: str):
    # Bytes that are not UTF-8 decode to lone surrogates (surrogateescape), so one bad byte costs only
    # the row it is in; a strict decoder would fail on a read-ahead block and lose the rows around it.
    with FileSystems.open(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        if any(_has_surrogate(h) for h in header):
            for _ in reader:  # no row can be read without its column names; each is a dead letter
                yield reader.line_num, None, "unreadable: the file's header is not valid UTF-8", None
            return
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield reader.line_num, None, f"malformed CSV ({e})", None
                continue
            if not values:
                continue
            raw = ",".join(values)
            if any(_has_surrogate(v) for v in values):
                yield reader.line_num, None, "invalid UTF-8", raw.encode("utf-8", "surrogateescape").decode(
                    "utf-8", "replace")
                continue
            if len(values) != len(header):
                yield reader.line_num, None, f"{len(values)} columns, the header has {len(header)}", raw
                continue
            yield reader.line_num, dict(zip(header, values)), None, None


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")  # lone surrogates (from undecodable bytes) cannot be encoded
    except UnicodeEncodeError:
        return True
    return False


def _parquet_parts(path: str, batch_rows: int):
    """Batches holding Arrow tables (no Python object per row), and (row, error, None) where unreadable."""
    with FileSystems.open(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            yield 1, f"not a readable Parquet file ({e})", None
            return
        n = 0
        try:
            for record_batch in pf.iter_batches(batch_size=batch_rows):
                if record_batch.num_rows:
                    yield Batch(record_batch, source=path, positions=range(n + 1, n + 1 + record_batch.num_rows))
                    n += record_batch.num_rows
        except (pa.ArrowException, OSError) as e:
            # Every row the file says it holds but could not give is a dead letter of its own.
            for row in range(n + 1, max(pf.metadata.num_rows, n + 1) + 1):
                yield row, f"unreadable: the file fails from row {n + 1} on ({e})", None


class WriteDataset(beam.PTransform):
    """Writes rows or `Batch`es to `directory` as sharded Parquet (default) or JSONL files.

    columns: write only these fields (default: all).  prefix: file name prefix ("part").
    Each bundle writes its own shards `prefix-<uuid>.<ext>`, committed by rename, so no file is ever
    seen half-written.  Delivery is at least once: if a runner retries a bundle after it committed a
    file, that file's rows are written again.  `bulkinfer run` uses per-input-file commits instead
    (shards.py), which a retry cannot duplicate.  Returns a PCollection of the committed file paths.
    """

    def __init__(self, directory: str, *, format: str = "parquet", columns: list[str] | None = None,
                 prefix: str = "part", rows_per_file: int = 100_000):
        super().__init__()
        if format not in WRITE_FORMATS:
            raise ValueError(f"unknown output format {format!r}; expected one of {WRITE_FORMATS}")
        self._args = dict(directory=directory.rstrip("/"), fmt=format, columns=columns, prefix=prefix,
                          rows_per_file=rows_per_file)

    def expand(self, pcoll):
        return pcoll | "Write" >> beam.ParDo(_WriteShards(**self._args))


class _WriteShards(beam.DoFn):
    def __init__(self, *, directory, fmt, columns, prefix, rows_per_file):
        self._dir, self._fmt, self._columns, self._prefix = directory, fmt, columns, prefix
        self._rows_per_file = rows_per_file
        self._written = Metrics.counter(NAMESPACE, "written_rows")

    def setup(self):
        ensure_dir(self._dir)

    def start_bundle(self):
        self._buf = ShardBuffer(self._columns)

    def process(self, element):
        if isinstance(element, SourceDone):
            return
        self._buf.add(element if isinstance(element, Batch) else Batch([element]))
        if len(self._buf) >= self._rows_per_file:
            yield self._commit()

    def finish_bundle(self):
        if len(self._buf):
            yield WindowedValue(self._commit(), MIN_TIMESTAMP, [GlobalWindow()])

    def _commit(self) -> str:
        final = FileSystems.join(self._dir, f"{self._prefix}-{uuid.uuid4().hex[:16]}.{self._fmt}")
        n = len(self._buf)
        commit(self._buf.write_temp(final, self._fmt), final)
        self._written.inc(n)
        return final


class ShardBuffer:
    """The rows of one output file as they arrive: Arrow tables (kept columnar) and dict rows.

    columns: keep only these (a missing one is all nulls); None keeps every column.

        >>> buf = ShardBuffer(["id", "length"]); buf.add(batch); temp = buf.write_temp(final, "parquet")
    """

    def __init__(self, columns: list[str] | None):
        self._columns = columns
        self._parts: list[pa.Table | list[dict]] = []
        self._rows = 0

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

    def write_temp(self, final: str, fmt: str) -> str:
        """Writes everything buffered under the temporary name of `final` (see `write_temp`) and empties."""
        parts, self._parts, self._rows = self._parts, [], 0
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
            pq.write_table(rows if isinstance(rows, pa.Table) else rows_to_table(rows), f)
        else:
            rows = table_rows(rows) if isinstance(rows, pa.Table) else rows
            f.write("".join(to_json(r) + "\n" for r in rows).encode("utf-8"))
    return temp


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
