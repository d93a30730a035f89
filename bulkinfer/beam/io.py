"""Datasets in and out: JSONL, Parquet and CSV by file extension, on any Beam filesystem.

    >>> rows = p | ReadDataset("data/*.jsonl")                 # PCollection of Batch
    >>> rows | WriteDataset("out/", format="parquet")          # out/part-<uuid>.parquet

Both move `Batch`es of rows, not single rows.  A line or record that cannot be read (malformed JSON,
invalid UTF-8, a CSV row with the wrong column count) is a dead letter naming the file and line; by
default it fails the job, after `.with_exception_handling()` it is returned as a second output.
Files are written to a temporary name and renamed when complete, so a killed job never leaves a
half-written file that looks finished.

Input is read in units of work (`Unit`, planned by `plan_units`): a whole file, or, for a file larger
than `unit_size` bytes, a range of it, so one large file spreads over workers and a resumed job redoes
one range, not the file.  JSONL files split into byte ranges cut just after a newline (a range owns the
lines that start inside it); Parquet files into runs of whole row groups.  CSV files are never split: a
quoted field may hold a newline, so only a CSV parser reading from the start can tell where a row
begins.  A UTF-8 byte-order mark at the start of a JSONL or CSV file is skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import sys
import uuid
import warnings

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import (
    FAILED,
    NAMESPACE,
    Batch,
    dead_letter,
    escape_surrogates,
    in_global_window,
    position_text,
    table_rows,
    to_json,
)

COUNTS = "counts"  # tag of the reader's per-unit counts: (unit key, ("read", rows, failed, Unit, "host:pid"))
UNIT_SIZE = 64 << 20  # bytes: files larger than this are split into units of about this size
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, as spreadsheet programs write it
CSV_FIELD_LIMIT = 1 << 30  # characters: Python's csv module refuses fields over 128 KiB by default
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unit:
    """A unit of work: a whole input file or a range of one, read, committed and resumed as one.

    source: the file.  fingerprint: its size and modification time (and checksum, where the filesystem
      gives one) when planned; a commit record keeps it, so that a changed file is redone.
    start, stop: the range.  JSONL: byte offsets, `start` at the beginning of a line; the unit owns the
      lines that start in [start, stop).  Parquet: row-group indices [start, stop).  stop None: to the end.
    first: the 1-based line (row) number of the unit's first line (row) in the file, for error messages.
    """

    source: str
    fingerprint: str = ""
    start: int = 0
    stop: int | None = None
    first: int = 1

    @property
    def key(self) -> str:
        """16 hex digits naming the unit in output file names and commit records."""
        return hashlib.sha1(f"{self.source}\0{self.start}\0{self.stop}".encode()).hexdigest()[:16]

    def describe(self) -> str:
        """'data/a.jsonl' for a whole file, 'data/a.jsonl bytes 0-65536' for a range."""
        if self.start == 0 and self.stop is None:
            return self.source
        unit = "row groups" if input_format(self.source) == "parquet" else "bytes"
        return f"{self.source} {unit} {self.start}-{'end' if self.stop is None else self.stop}"


# Beam compiles "[[]" (an escaped "[") into a regular expression that Python flags as a possible nested
# set; it means what it says here.
warnings.filterwarnings("ignore", message="Possible nested set", category=FutureWarning,
                        module="apache_beam.io.filesystem")


def escape_glob(path: str) -> str:
    """`path` as a Beam match pattern that matches only itself: each of [ * ? in a file or directory name
    becomes a one-character class ("data[1].jsonl" -> "data[[]1].jsonl")."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def delete(paths: list[str]) -> None:
    """Deletes these files (on any Beam filesystem), taking each path literally: Beam's delete matches
    its arguments as patterns, so a name with [ * ? would otherwise miss its file."""
    FileSystems.delete([escape_glob(p) for p in paths])


def fingerprint(metadata) -> str:
    """'size:mtime[:checksum]' of a Beam FileMetadata: changes whenever the file's content does."""
    parts = [str(metadata.size_in_bytes), repr(getattr(metadata, "last_updated_in_seconds", None))]
    checksum = getattr(metadata, "checksum", None)
    if checksum:
        parts.append(str(checksum))
    return ":".join(parts)


def plan_units(files: list[str], unit_size: int = UNIT_SIZE) -> list[Unit]:
    """The units of work of `files`: one per file, or ranges of about `unit_size` bytes for larger files.

    Splitting a JSONL file reads it once here (to cut just after newlines and number the lines);
    Parquet files are split from their footers.  CSV files are never split (see the module docstring).
    Raises FileNotFoundError for a file that is gone, ValueError for unit_size < 1.
    """
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1 byte, got {unit_size}")
    units = []
    for path in files:
        matched = FileSystems.match([escape_glob(path)])[0].metadata_list
        if not matched:
            raise FileNotFoundError(f"input file {path} is gone")
        meta = matched[0]
        fp = fingerprint(meta)
        fmt = input_format(path)
        if meta.size_in_bytes <= unit_size or fmt == "csv":
            units.append(Unit(source=path, fingerprint=fp))
        elif fmt == "parquet":
            units.extend(_parquet_units(path, fp, unit_size))
        else:
            cuts = _line_cuts(path, unit_size)
            for (start, first), (stop, _) in zip(cuts, cuts[1:] + [(None, 0)]):
                units.append(Unit(source=path, fingerprint=fp, start=start, stop=stop, first=first))
    return units


def _line_cuts(path: str, unit_size: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of the line starting there: 0 and, about every unit_size bytes, the
    first line starting after that many bytes."""
    cuts = [(0, 1)]
    target, base, lines = unit_size, 0, 0  # next cut at or after `target`; newlines before `base`
    with FileSystems.open(path) as f:
        while chunk := f.read(1 << 20):
            pos = 0
            while target < base + len(chunk):
                i = chunk.find(b"\n", max(target - base, pos))
                if i < 0:
                    break
                cuts.append((base + i + 1, lines + chunk.count(b"\n", 0, i + 1) + 1))
                target, pos = base + i + 1 + unit_size, i + 1
            lines += chunk.count(b"\n")
            base += len(chunk)
    if cuts[-1][0] >= base and len(cuts) > 1:  # a cut at the very end owns nothing
        cuts.pop()
    return cuts


def _parquet_units(path: str, fp: str, unit_size: int) -> list[Unit]:
    with FileSystems.open(path) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError):  # the reader makes its dead letter
            return [Unit(source=path, fingerprint=fp)]
    units, start, first, size, rows = [], 0, 1, 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if size >= unit_size or g == meta.num_row_groups - 1:
            units.append(Unit(source=path, fingerprint=fp, start=start, stop=g + 1, first=first))
            start, first, size, rows = g + 1, first + rows, 0, 0
    if len(units) <= 1:
        return [Unit(source=path, fingerprint=fp)]
    units[-1] = dataclasses.replace(units[-1], stop=None)
    return units


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
        records = _jsonl_records(unit) if fmt == "jsonl" else _csv_records(unit.source)
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


def _csv_records(path: str):
    # Bytes that are not UTF-8 decode to lone surrogates (surrogateescape), so one bad byte costs only
    # the row it is in; a strict decoder would fail on a read-ahead block and lose the rows around it.
    # utf-8-sig skips a byte-order mark (else it would become part of the first column's name).
    csv.field_size_limit(min(CSV_FIELD_LIMIT, sys.maxsize))
    with FileSystems.open(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
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
    Each bundle writes its own shards `prefix-<uuid>.<ext>`, committed by rename, so no file is ever
    seen half-written.  Delivery is at least once: if a runner retries a bundle after it committed a
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
        ensure_dir(self._dir)

    def start_bundle(self):
        self._buf = ShardBuffer(self._columns)

    def process(self, element):
        self._buf.add(element if isinstance(element, Batch) else Batch([element]))
        if len(self._buf) >= self._rows_per_file:
            yield self._commit()

    def finish_bundle(self):
        if len(self._buf):
            yield in_global_window(self._commit())

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
