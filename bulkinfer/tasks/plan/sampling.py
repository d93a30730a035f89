"""A deterministic sample of the input's real rows (step 2 of `bulkinfer.tasks.plan`).

`sample` rows spread over the files in proportion to their rows, evenly spaced within each file (long
files: evenly spaced runs of consecutive rows, read with seeks), so the sample has the input's length
distribution and its share of bad rows.  The rows are copied verbatim into sample files of the input's
format.  The same input gives the same sample.

    >>> files = ["in/a.jsonl", "in/b.parquet"]
    >>> sample_rows(files, [count_rows(f) for f in files], 2000, "workdir/sample")
    ['workdir/sample/sample.jsonl', 'workdir/sample/sample-0.parquet']
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam import io
from bulkinfer.beam.units import input_format
from bulkinfer.tasks.plan.counting import nonblank_lines

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are read whole when sampling; larger ones by runs
RUN_ROWS = 64  # consecutive rows per run when sampling a large file


def allocate(counts: list[int], sample: int) -> list[int]:
    """Rows to sample from each file: `sample` (at most the total) in proportion to the files' rows,
    by largest remainder, so the shares add up exactly; a file never gives more rows than it has."""
    total = sum(counts)
    n = min(sample, total)
    if not total:
        return [0] * len(counts)
    exact = np.array(counts, dtype=float) * n / total
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    return [int(min(t, c)) for t, c in zip(take, counts)]


def _spread(count: int, n: int) -> np.ndarray:
    """n distinct indices evenly spaced over range(count) (n <= count)."""
    if n <= 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.floor((np.arange(n) + 0.5) * count / n).astype(int))


def sample_rows(files: list[str], counts: list[int], sample: int, directory: str) -> list[str]:
    """Writes a deterministic sample of the files' rows into `directory` as files of the input formats
    (rows copied verbatim; one file per format, or per CSV header / Parquet schema that cannot be
    merged) and returns their paths."""
    jsonl: list[bytes] = []
    tables: list[pa.Table] = []
    csv_groups: dict[tuple, list[list[str]]] = {}
    for path, count, n in zip(files, counts, allocate(counts, sample)):
        if not n:
            continue
        fmt = input_format(path)
        if fmt == "jsonl":
            jsonl.extend(_sample_jsonl(path, count, n))
        elif fmt == "parquet":
            table = _sample_parquet(path, count, n)
            if table is not None:
                tables.append(table)
        else:
            for header, values in _sample_csv(path, count, n):
                csv_groups.setdefault(tuple(header), []).append(values)
    written = []
    if jsonl:
        written.append(os.path.join(directory, "sample.jsonl"))
        with open(written[-1], "wb") as f:
            f.write(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in jsonl))
    if tables:
        try:
            merged = [pa.concat_tables(tables, promote_options="default")]
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            merged = tables  # columns of different types in different files: one sample file each
        for k, table in enumerate(merged):
            written.append(os.path.join(directory, f"sample-{k}.parquet"))
            pq.write_table(table, written[-1])
    for k, (header, rows) in enumerate(csv_groups.items()):
        written.append(os.path.join(directory, f"sample-{k}.csv"))
        with open(written[-1], "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return written


def _sample_jsonl(path: str, count: int, n: int) -> list[bytes]:
    """n non-blank lines of a JSONL file: evenly spaced lines of a small file, runs of RUN_ROWS lines
    at evenly spaced byte offsets of a large one."""
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    with FileSystems.open(path) as f:
        if size <= WHOLE_FILE_BYTES:
            lines = [line for line in f.read().removeprefix(io.BOM).split(b"\n") if nonblank_lines(line + b"\n")]
            return [lines[i] for i in _spread(len(lines), min(n, len(lines)))]
        runs = math.ceil(n / RUN_ROWS)
        picked: list[bytes] = []
        for offset in (np.arange(runs) * size // runs).tolist():
            f.seek(offset)
            if offset:
                f.readline()  # the rest of a line that started before the offset
            run = []
            while len(run) < min(RUN_ROWS, n - len(picked)):
                line = f.readline()
                if not line:
                    break
                if nonblank_lines(line if line.endswith(b"\n") else line + b"\n"):
                    run.append(line.removeprefix(io.BOM))
            picked.extend(run)
        return picked


def _sample_parquet(path: str, count: int, n: int) -> pa.Table | None:
    """n rows of a Parquet file: evenly spaced rows of a small file, runs of RUN_ROWS rows at evenly
    spaced positions of a large one (reading each touched row group only up to its last run)."""
    with FileSystems.open(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError):
            return None
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        if size <= WHOLE_FILE_BYTES:
            table = pf.read()
            return table.take(pa.array(_spread(table.num_rows, min(n, table.num_rows))))
        runs = math.ceil(n / RUN_ROWS)
        starts = (np.arange(runs) * count // runs).tolist()
        wanted = np.unique(np.concatenate([np.arange(s, min(s + RUN_ROWS, count)) for s in starts]))[:n]
        group_starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        parts = []
        for g in np.unique(np.searchsorted(group_starts, wanted, side="right") - 1).tolist():
            lo, hi = group_starts[g], group_starts[g + 1]
            local = wanted[(wanted >= lo) & (wanted < hi)] - lo
            seen = 0
            for batch in pf.iter_batches(batch_size=4096, row_groups=[g]):
                inside = local[(local >= seen) & (local < seen + batch.num_rows)] - seen
                if len(inside):
                    parts.append(pa.Table.from_batches([batch]).take(pa.array(inside)))
                seen += batch.num_rows
                if seen > local[-1]:
                    break
        return pa.concat_tables(parts) if parts else None


def _sample_csv(path: str, count: int, n: int):
    """(header, values) of n evenly spaced records of a CSV file (parsed whole: rows cannot be found by
    seeking); records the csv module cannot parse are not copied."""
    chosen = set(_spread(count, n).tolist())
    for i, record in enumerate(io.csv_records(path)):
        if i in chosen and record.values is not None:
            yield record.header, record.values


def one_row_copy(path: str, destination: str) -> None:
    """The first row of a sample file, alone, in a file of the same format (the calibration units)."""
    fmt = input_format(path)
    if fmt == "parquet":
        pq.write_table(pq.read_table(path).slice(0, 1), destination)
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            line = f.readline()
        with open(destination, "wb") as f:
            f.write(line)
    else:
        with open(path, "rb") as f:
            head = b"".join([f.readline(), f.readline()])
        if b'"' in head:  # a quoted field may span lines: copy the first record as the csv module reads it
            first = next(io.csv_records(path))
            with open(destination, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                csv.writer(f).writerows([first.header, first.values])
        else:
            with open(destination, "wb") as f:
                f.write(head)
