"""Units of work: a whole input file, or a range of one, planned before the pipeline runs.

    units = plan_units(match_files("data/*.jsonl"), unit_size=64 << 20)   # [Unit(source, start, stop, ...)]

A file larger than `unit_size` bytes is split, so that one large file spreads over workers and a
resumed job redoes one range, not the file: JSONL files into byte ranges cut just after a newline (a
range owns the lines that start inside it), Parquet files into runs of whole row groups.  CSV files are
never split: a quoted field may hold a newline, so only a CSV parser reading from the start can tell
where a row begins.  Also here: the input's fingerprint (what a commit record keeps to notice a changed
input) and literal paths for Beam's pattern-matching filesystem calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

UNIT_SIZE = 64 << 20  # bytes: files larger than this are split into units of about this size
READ_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def input_format(path: str) -> str:
    for ext, fmt in READ_FORMATS.items():
        if path.lower().endswith(ext):
            return fmt
    raise ValueError(f"{path}: unknown input format; expected one of the extensions {sorted(READ_FORMATS)}")


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
