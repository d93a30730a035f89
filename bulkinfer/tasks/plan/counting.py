"""Rows of an input file, counted as a run counts its rows_in (step 1 of `bulkinfer.tasks.plan`).

Parquet from the files' footers; JSONL by a scan of the bytes for lines that are not blank (no JSON
parsing); CSV by counting lines, or, for a file holding a quote character or a carriage return (a quoted
field may hold a newline), by parsing it with the reader's own parser (`io.csv_records`).

    >>> count_rows("data/part-0.jsonl")
    1000
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam import io
from bulkinfer.beam.units import input_format


def count_rows(path: str) -> int:
    """The rows a run reads from one file (its rows_in: readable rows and unreadable records alike).

    Parquet: the footer's row count (an unreadable file counts 1, its dead letter).  JSONL: lines that
    are not blank.  CSV: records after the header that are not empty lines.  Raises OSError when the
    file cannot be opened.
    """
    fmt = input_format(path)
    if fmt == "parquet":
        with FileSystems.open(path) as f:
            try:
                return pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowInvalid, OSError):
                return 1
    if fmt == "jsonl":
        return _count_jsonl(path)
    return _count_csv(path)


# A line with no printable ASCII character: blank unless it holds other (non-space) characters.
_NO_PRINTABLE = re.compile(rb"(?m)^[^!-~\n]*$")
_ASCII_SPACE = b" \t\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _count_jsonl(path: str) -> int:
    """Lines that are not blank (after the reader's decoding: Python whitespace only is blank)."""
    rows, rest, first = 0, b"", True
    with FileSystems.open(path) as f:
        while True:
            chunk = f.read(1 << 20)
            if first:
                chunk, first = chunk.removeprefix(io.BOM), False
            if not chunk:
                break
            data = rest + chunk
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            rows += nonblank_lines(data[:end + 1])
            rest = data[end + 1:]
    if rest:
        rows += nonblank_lines(rest + b"\n")
    return rows


def nonblank_lines(data: bytes) -> int:
    """Lines of `data` (complete, each ending in a newline) that are not blank."""
    lines = data.count(b"\n")
    for m in _NO_PRINTABLE.finditer(data):
        if m.start() == len(data):  # the empty match after the final newline
            continue
        line = m.group()
        if not line.strip(_ASCII_SPACE):
            lines -= 1
            continue
        try:
            if not line.decode("utf-8").strip():
                lines -= 1
        except UnicodeDecodeError:
            pass  # an undecodable line is a row (a dead letter)
    return lines


def _count_csv(path: str) -> int:
    """Records after the header that are not empty lines; the csv module's count for a file with a quote
    character or a carriage return (a quoted field may hold a newline; "\\r" alone ends a record)."""
    rows, rest, first, header = 0, b"", True, None
    with FileSystems.open(path) as f:
        while chunk := f.read(1 << 20):
            if first:
                chunk, first = chunk.removeprefix(io.BOM), False
            if b'"' in chunk or b"\r" in chunk:
                return sum(1 for _ in io.csv_records(path))
            data = rest + chunk
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            block, rest = data[:end + 1], data[end + 1:]
            if header is None:  # the first line is the header, even an empty one
                header, block = block[:block.index(b"\n")], block[block.index(b"\n") + 1:]
            if block:
                empty = (block[:1] == b"\n") + len(_EMPTY_LINE.findall(block))
                rows += block.count(b"\n") - empty
    if rest and header is not None:
        rows += 1
    return rows


_EMPTY_LINE = re.compile(rb"\n(?=\n)")
