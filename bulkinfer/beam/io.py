"""Datasets in and out: JSONL, Parquet and CSV by file extension, on any Beam filesystem.

    >>> rows = p | ReadDataset("data/*.jsonl")                 # PCollection of Batch
    >>> rows | WriteDataset("out/", format="parquet")          # out/part-<uuid>.parquet

Both move `Batch`es of rows, not single rows.  A line or record that cannot be read (malformed JSON,
invalid UTF-8, a CSV row with the wrong column count) is a dead letter naming the file and line; by
default it fails the job, after `.with_exception_handling()` it is returned as a second output.
Files are written to a temporary name and renamed when complete, so a killed job never leaves a
half-written file that looks finished.

Input is read in units of work (`units.Unit`, planned by `units.plan_units`): a whole file or a range of
one.  A UTF-8 byte-order mark at the start of a JSONL or CSV file is skipped.  Output files are
written by `writers`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import (
    FAILED,
    NAMESPACE,
    Batch,
    dead_letter,
    in_global_window,
    position_text,
)
from bulkinfer.beam.units import UNIT_SIZE, Unit, input_format, plan_units
from bulkinfer.beam.writers import BYTES_PER_FILE, ShardWriter, commit, ensure_dir, use_system_memory_pool

COUNTS = "counts"  # tag of the reader's per-unit counts: (unit key, ("read", rows, failed, Unit, "host:pid"))
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, as spreadsheet programs write it
CSV_FIELD_LIMIT = 1 << 30  # characters: Python's csv module refuses fields over 128 KiB by default
WRITE_FORMATS = ("parquet", "jsonl")


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

    files: read exactly these files instead of matching the pattern.  units: read exactly these units
    (from `plan_units`, e.g. those a resumed job has left) instead of files.  unit_size: bytes per unit
    of work (see the module docstring); each Batch carries its unit's key.
    """

    def __init__(self, pattern: str | None = None, *, batch_rows: int = 1024, files: list[str] | None = None,
                 units: list[Unit] | None = None, unit_size: int = UNIT_SIZE):
        super().__init__()
        if units is None:
            units = plan_units(match_files(pattern) if files is None else list(files), unit_size)
        self._units = list(units)
        self._batch_rows = batch_rows
        self._dead_letters = False

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(u.source for u in self._units))

    @property
    def units(self) -> list[Unit]:
        return list(self._units)

    def with_exception_handling(self) -> ReadDataset:
        """Return (batches, dead_letters) instead of failing on an unreadable record."""
        self._dead_letters = True
        return self

    def expand(self, pbegin):
        result = pbegin | "Units" >> ReadUnits(self._units, batch_rows=self._batch_rows)
        if self._dead_letters:
            return result.rows, result[FAILED]
        _ = result[FAILED] | "FailOnDeadLetter" >> beam.Map(_fail)
        return result.rows


class ReadUnits(beam.PTransform):
    """Reads units of work; returns Beam's tagged outputs: `rows` (Batches), FAILED (dead letters, each
    with its "unit") and COUNTS (per unit, once: (unit key, ("read", rows read, records failed, Unit,
    "host:pid" of the reader))).
    """

    def __init__(self, units: list[Unit], *, batch_rows: int = 1024):
        super().__init__()
        self._units, self._batch_rows = list(units), batch_rows

    def expand(self, pbegin):
        # Create reshuffles (reshuffle=True, its default) when there are two units or more, which
        # spreads them over workers.
        return (pbegin
                | "Units" >> beam.Create(self._units)
                | "Read" >> beam.ParDo(_ReadUnit(self._batch_rows)).with_outputs(FAILED, COUNTS, main="rows"))


def _worker() -> str:
    """host:pid of this process, so a commit record tells which worker read its unit."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail(letter):
    raise ValueError(f"{letter['error']}; use ReadDataset(...).with_exception_handling() to skip such records")


class _ReadUnit(beam.DoFn):
    def __init__(self, batch_rows: int):
        self._batch_rows = batch_rows
        self._rows = Metrics.counter(NAMESPACE, "read_rows")
        self._failed = Metrics.counter(NAMESPACE, "read_rows_failed")

    def process(self, unit: Unit):
        fmt = input_format(unit.source)
        path, key = unit.source, unit.key
        parts = _parquet_parts(unit, self._batch_rows) if fmt == "parquet" else self._dict_parts(unit, fmt)
        n_rows = n_failed = 0
        for part in parts:
            if isinstance(part, Batch):
                n_rows += len(part)
                self._rows.inc(len(part))
                yield part
                continue
            position, error, raw = part
            n_failed += 1
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILED, dead_letter(
                stage="read", error=f"{position_text(path, position)}: {error}", record=raw, source=path,
                position=position, unit=key))
        yield beam.pvalue.TaggedOutput(COUNTS, (key, ("read", n_rows, n_failed, unit, _worker())))

    def _dict_parts(self, unit: Unit, fmt: str):
        """Batches of dict rows, and (position, error, raw record) for each unreadable record."""
        records = _jsonl_records(unit) if fmt == "jsonl" else _csv_rows(unit.source)
        rows, positions = [], []
        for position, row, error, raw in records:
            if error is not None:
                yield position, error, raw
                continue
            rows.append(row)
            positions.append(position)
            if len(rows) >= self._batch_rows:
                yield Batch(rows, source=unit.source, positions=positions, unit=unit.key)
                rows, positions = [], []
        if rows:
            yield Batch(rows, source=unit.source, positions=positions, unit=unit.key)


# Each dict-row reader yields (1-based line/row number, row or None, error or None, raw record).


def _jsonl_records(unit: Unit):
    with FileSystems.open(unit.source) as f:
        offset = unit.start
        if offset:
            f.seek(offset)
        for n, raw in enumerate(f, unit.first):
            if unit.stop is not None and offset >= unit.stop:
                return
            if offset == 0 and raw.startswith(BOM):
                offset, raw = len(raw), raw[len(BOM):]
            else:
                offset += len(raw)
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
                yield n, None, f"malformed JSON ({e.msg.removesuffix(' at')} at character {e.pos})", line.rstrip("\n")
                continue
            if not isinstance(row, dict):
                yield n, None, f"expected a JSON object, got {type(row).__name__}", line.rstrip("\n")
                continue
            yield n, row, None, None


class CsvRecord(NamedTuple):
    """One record after a CSV file's header, as the reader parses it (see `csv_records`)."""

    line: int  # 1-based line number where the record ends (a quoted field may span lines)
    header: list[str]  # the file's column names
    values: list[str] | None  # the record's values; None where the csv module cannot parse it
    error: str | None  # why the record is not a row (a dead letter), or None


def csv_records(path: str) -> Iterator[CsvRecord]:
    """Every record after the header of a CSV file on any Beam filesystem, as `ReadDataset` reads it.

    UTF-8; a byte-order mark is skipped (else it would become part of the first column's name).  Bytes
    that are not UTF-8 decode to lone surrogates (surrogateescape), so one bad byte costs only the record
    it is in; a strict decoder would fail on a read-ahead block and lose the records around it.  Empty
    lines are skipped.  A record is a dead letter (`error` set) when the csv module cannot parse it, when
    it holds bytes that are not UTF-8, when its column count differs from the header's, or when the
    header itself is not UTF-8 (no row can be read without its column names).  Fields up to
    CSV_FIELD_LIMIT characters.  Raises OSError when the file cannot be opened.

        >>> for line, header, values, error in csv_records("data/in.csv"):
        ...     row = dict(zip(header, values)) if error is None else None
    """
    csv.field_size_limit(min(CSV_FIELD_LIMIT, sys.maxsize))
    with FileSystems.open(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            return
        unreadable = "unreadable: the file's header is not valid UTF-8" if any(
            _has_surrogate(h) for h in header) else None
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield CsvRecord(reader.line_num, header, None, unreadable or f"malformed CSV ({e})")
                continue
            if not values:
                continue
            if unreadable:
                error = unreadable
            elif any(_has_surrogate(v) for v in values):
                error = "invalid UTF-8"
            elif len(values) != len(header):
                error = f"{len(values)} columns, the header has {len(header)}"
            else:
                error = None
            yield CsvRecord(reader.line_num, header, values, error)


def _csv_rows(path: str):
    for line, header, values, error in csv_records(path):
        if error is None:
            yield line, dict(zip(header, values)), None, None
        elif values is None:
            yield line, None, error, None
        else:  # the record's text, undecodable bytes shown as U+FFFD
            raw = ",".join(values).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield line, None, error, raw


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")  # lone surrogates (from undecodable bytes) cannot be encoded
    except UnicodeEncodeError:
        return True
    return False


def _parquet_parts(unit: Unit, batch_rows: int):
    """Batches holding Arrow tables (no Python object per row), and (row, error, None) where unreadable."""
    path = unit.source
    with FileSystems.open(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            yield 1, f"not a readable Parquet file ({e})", None
            return
        groups = range(unit.start, pf.metadata.num_row_groups if unit.stop is None else unit.stop)
        expected = sum(pf.metadata.row_group(g).num_rows for g in groups)
        first, n = unit.first, 0
        try:
            for record_batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(groups)):
                if record_batch.num_rows:
                    yield Batch(record_batch, source=path, unit=unit.key,
                                positions=range(first + n, first + n + record_batch.num_rows))
                    n += record_batch.num_rows
        except (pa.ArrowException, OSError) as e:
            # Every row the unit should hold but could not give is a dead letter of its own.
            for row in range(first + n, first + max(expected, n + 1)):
                yield row, f"unreadable: the file fails from row {first + n} on ({e})", None


class WriteDataset(beam.PTransform):
    """Writes rows or `Batch`es to `directory` as sharded Parquet (default) or JSONL files.

    columns: write only these fields (default: all).  prefix: file name prefix ("part").
    Each bundle writes its own shards `prefix-<uuid>.<ext>` (at most rows_per_file rows and about
    `writers.BYTES_PER_FILE` bytes each), a row group at a time as rows arrive (`writers.ShardWriter`:
    memory does not grow with the data), committed by rename, so no file is ever seen half-written.  Delivery is at least once: if a runner retries a bundle after it committed a
    file, that file's rows are written again.  `bulkinfer run` commits per unit of work instead
    (commit.py), which a retry cannot duplicate.  Returns a PCollection of the committed file paths.
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
        use_system_memory_pool()
        ensure_dir(self._dir)

    def start_bundle(self):
        self._abort()  # a writer a failed bundle left open
        self._writer = ShardWriter(self._new_name, self._fmt, self._columns, rows_per_file=self._rows_per_file,
                                   bytes_per_file=BYTES_PER_FILE)

    def teardown(self):
        self._abort()

    def _abort(self):
        if getattr(self, "_writer", None) is not None:
            self._writer.abort()

    def process(self, element):
        yield from self._commit(self._writer.add(element if isinstance(element, Batch) else Batch([element])))

    def finish_bundle(self):
        for final in self._commit(self._writer.close()):
            yield in_global_window(final)

    def _new_name(self) -> str:
        return FileSystems.join(self._dir, f"{self._prefix}-{uuid.uuid4().hex[:16]}.{self._fmt}")

    def _commit(self, done: list[tuple[str, str, int]]):
        for temp, final, n in done:
            commit(temp, final)
            self._written.inc(n)
            yield final
