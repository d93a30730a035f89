"""`bulkinfer plan`: how long a job takes on this machine, how many accelerators a deadline needs, what it costs.

    >>> from bulkinfer.models.resolve import model_spec
    >>> from bulkinfer.tasks.run import JobSpec
    >>> job = JobSpec(input="data/*.parquet", output="")          # the job to size; output is not used
    >>> report = plan(model_spec("minilm"), job, PlanSpec(sample=2000, deadline_s=7200, price_per_hour=3.5))
    >>> report["predicted_seconds"], report["tolerance"], report["accelerators_needed"], report["cost"]

How it answers:

1. **Rows.**  Counted as a run counts its rows_in (`count_rows`): Parquet from the files' footers; JSONL
   by a scan of the bytes for lines that are not blank (no JSON parsing); CSV by counting lines, or, for
   a file holding a quote character or a carriage return (a quoted field may hold a newline), by
   parsing it with the reader's own parser (`io.csv_records`).
2. **A sample of the real rows** (`sample_rows`): `sample` rows spread over the files in proportion to
   their rows, evenly spaced within each file (long files: evenly spaced runs of consecutive rows, read
   with seeks), so the sample has the input's length distribution and its share of bad rows.  The rows
   are copied verbatim into sample files of the input's format.  Deterministic: the same input gives
   the same sample.
3. **Measured, not assumed** (`measure`).  The sample runs through the job itself (`tasks.run.run`:
   Beam's embedded FnApiRunner, reading, tokenization, bucketing, the engine on this machine's
   devices, writing, commits), several times, each timed from call to return:
       R1  a first run with every batch shape compiled (`warmup`), which fills the persistent
           compilation cache as a first run on the machine does; not used in the fit;
       R2  the sample, the model loaded afresh (as a new `bulkinfer run` process does);
       R3  the sample again, the model already loaded: R2 - R3 = load and compile of a fresh process;
       R4  one row, one unit; R5  k one-row units in one wave; R6  the same k units, one per wave.
   A run's wall time is modelled as
       T = per_run + load_compile + waves * per_wave + units * per_unit + rows * per_row
   and R3-R6 give the four costs besides load_compile exactly (four equations, four unknowns; a
   negative one, from noise, becomes 0).  The plan drops the model it loaded, and any instance this
   process held before (`loading.release`), so the job that follows, in this process or another,
   starts as R2 did.  The model: what a new process pays before its first row (load, and compiles
   read from the cache) and what each wave, unit and row costs; a job may use batch shapes that the
   sample did not (read from the cache R1 filled), which the sample's R2 does not count.
4. **The answer** (`estimate`): predicted_seconds for this machine running the whole job, with the
   stated tolerance; accelerator-hours; with a deadline, how many accelerators (workers like this
   machine, or of `--accelerator` type at `--rows-per-s`) finish in time; the cost at a price per
   accelerator-hour; and the assumptions, in words.

The speed of another accelerator is never invented: without `rows_per_s` measured there, the per-row
time is this machine's, and the report says so.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from bulkinfer.beam import io
from bulkinfer.beam.loading import release
from bulkinfer.beam.units import input_format, plan_units
from bulkinfer.tasks import run as job_run

TOLERANCE = 0.3  # the stated relative error of predicted_seconds (see tests/tasks/test_plan.py)
CALIBRATION_UNITS = 4  # k one-row units of runs R5 and R6
WHOLE_FILE_BYTES = 64 << 20  # files up to this size are read whole when sampling; larger ones by runs
RUN_ROWS = 64  # consecutive rows per run when sampling a large file


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSpec:
    """What to measure and what to answer.

    sample: rows of the input to run (fewer if the input has fewer).
    deadline_s: wall-clock seconds the job must finish in (None: no deadline).
    price_per_hour: price of one accelerator-hour, in the user's currency (None: no cost).
    accelerator: the accelerator type the job will run on, e.g. "nvidia-h200" (None: this machine's).
    rows_per_s: rows per second measured on that accelerator (e.g. a plan run there); without it the
      per-row time is this machine's.
    tolerance: the stated relative error of predicted_seconds.
    Raises ValueError for a sample < 1, a deadline <= 0, a negative price or rows_per_s <= 0.
    """

    sample: int = 2000
    deadline_s: float | None = None
    price_per_hour: float | None = None
    accelerator: str | None = None
    rows_per_s: float | None = None
    tolerance: float = TOLERANCE

    def __post_init__(self):
        if self.sample < 1:
            raise ValueError(f"sample must be >= 1 row, got {self.sample}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"the deadline must be > 0 seconds, got {self.deadline_s}")
        if self.price_per_hour is not None and not self.price_per_hour >= 0:
            raise ValueError(f"the price per hour must be >= 0, got {self.price_per_hour}")
        if self.rows_per_s is not None and not self.rows_per_s > 0:
            raise ValueError(f"rows_per_s must be > 0, got {self.rows_per_s}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Costs:
    """What a run of the job costs on this machine, in seconds (see the module docstring's model)."""

    per_row_s: float
    per_unit_s: float
    per_wave_s: float
    per_run_s: float  # preparing the output, building the pipelines, the duplicate-id pass
    load_compile_s: float  # model load and compile in a fresh process, the compilation cache filled
    first_compile_s: float  # R1: the first run, every shape compiled (what the plan itself paid)
    sample_rows: int
    sample_units: int
    sample_failed: int  # rows of the sample that failed (dead letters)
    compiles: int  # batch shapes the sample compiled in R2
    device: str

    def seconds(self, *, rows: int, units: int, waves: int) -> float:
        """Predicted wall time of a run over `rows` rows in `units` units of work and `waves` waves."""
        return (self.per_run_s + self.load_compile_s + waves * self.per_wave_s + units * self.per_unit_s
                + rows * self.per_row_s)


# ---------------------------------------------------------------------------------------------- rows


def parse_duration(text: str) -> float:
    """'90m', '2h', '1h30m', '1.5d', '45s' or '3600' (seconds) -> seconds.

    Raises ValueError naming the value, for anything else or a duration that is not > 0.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+|\d+(?:\.\d+)?", value)
    if not parts:
        raise ValueError(f"{text!r} is not a duration; write e.g. 45m, 2h, 1h30m, 1.5d or 5400 (seconds)")
    if value[-1].isdigit():
        seconds = float(value)
    else:
        seconds = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", value))
    if seconds <= 0:
        raise ValueError(f"{text!r}: the deadline must be longer than 0 seconds")
    return seconds


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
            rows += _nonblank_lines(data[:end + 1])
            rest = data[end + 1:]
    if rest:
        rows += _nonblank_lines(rest + b"\n")
    return rows


def _nonblank_lines(data: bytes) -> int:
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


# -------------------------------------------------------------------------------------------- sample


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
            lines = [line for line in f.read().removeprefix(io.BOM).split(b"\n") if _nonblank_lines(line + b"\n")]
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
                if _nonblank_lines(line if line.endswith(b"\n") else line + b"\n"):
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


def _one_row_copy(path: str, destination: str) -> None:
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


# ------------------------------------------------------------------------------------------- measure


def measure(model, job: job_run.JobSpec, sample_files: list[str], workdir: str,
            pipeline_args: list[str] | None = None) -> Costs:
    """Runs the job on the sample (R1-R6 of the module docstring) in `workdir`; returns the fitted costs.

    Raises JobFailed when a sample run fails (as the job itself would), with the sample run named.
    """
    import jax

    devices = jax.devices()
    device = f"{devices[0].platform}: {len(devices)} x {devices[0].device_kind}"
    counter = iter(range(1_000_000))

    def timed(spec, files: list[str], **settings) -> tuple[float, dict]:
        """Wall time of the job over exactly `files` (all of one directory, or one file), and its report."""
        pattern = files[0] if len(files) == 1 else os.path.join(os.path.dirname(files[0]), "*")
        this = dataclasses.replace(job, input=pattern, output=os.path.join(workdir, f"out-{next(counter)}"),
                                   overwrite=True, **settings)
        t0 = time.perf_counter()
        try:
            report = job_run.run(spec, this, pipeline_args)
        except job_run.JobFailed as e:
            raise job_run.JobFailed(f"the plan's run on a sample of the input failed: {e}") from e
        return time.perf_counter() - t0, report

    one = os.path.join(workdir, "one")
    os.makedirs(one)
    k = CALIBRATION_UNITS
    for i in range(k):
        _one_row_copy(sample_files[0], os.path.join(one, f"row-{i}{_extension(sample_files[0])}"))
    ones = sorted(os.path.join(one, name) for name in os.listdir(one))
    sample_units = len(plan_units(sample_files, job.unit_size))

    release(model)
    first = _with_warmup(model)
    try:
        t1, _ = timed(first, sample_files)  # R1: fills the compilation cache
        release(first)
        t2, fresh = timed(model, sample_files)  # R2: load and compile as a new process
        t3, warm = timed(model, sample_files)  # R3: loaded
        t4, _ = timed(model, ones[:1])  # R4: one row, one unit
        t5, _ = timed(model, ones, wave_units=k)  # R5: k units, one wave
        t6, _ = timed(model, ones, wave_units=1)  # R6: k units, k waves
    finally:
        release(first)
        release(model)
    n, u = warm["rows_in"], sample_units
    per_wave = max(0.0, (t6 - t5) / (k - 1))
    unit_and_row = max(0.0, (t5 - t4) / (k - 1))  # per_unit + per_row (each calibration unit is one row)
    if n > u:
        per_row = max(0.0, (t3 - t4 - (u - 1) * unit_and_row) / (n - u))
    else:
        per_row = unit_and_row
    per_unit = max(0.0, unit_and_row - per_row)
    per_run = max(0.0, t4 - per_wave - per_unit - per_row)
    return Costs(per_row_s=per_row, per_unit_s=per_unit, per_wave_s=per_wave, per_run_s=per_run,
                 load_compile_s=max(0.0, t2 - t3), first_compile_s=t1, sample_rows=n, sample_units=u,
                 sample_failed=warm["rows_failed"], compiles=fresh["compiles"], device=device)


def _with_warmup(model):
    """The spec with every batch shape compiled at load (R1), if the spec has the setting."""
    if dataclasses.is_dataclass(model) and any(f.name == "warmup" for f in dataclasses.fields(model)):
        return dataclasses.replace(model, warmup=True)
    return model


def _extension(path: str) -> str:
    return os.path.splitext(path)[1]


# ------------------------------------------------------------------------------------------ estimate


def estimate(costs: Costs, *, rows: int, units: int, waves: int, spec: PlanSpec) -> dict:
    """The answer from measured costs: predicted_seconds on this machine, accelerator-hours, accelerators
    for the deadline and cost.  Pure arithmetic (tested apart from the measurement).

    A job split over A accelerators: each pays the per-run cost and the model's load and compile once;
    rows, units and waves divide.  A = ceil(divisible / (deadline - per-accelerator fixed)), at most the
    number of units (a unit runs on one worker; `deadline_problem` says so when that is not enough).
    """
    predicted = costs.seconds(rows=rows, units=units, waves=waves)
    per_row = costs.per_row_s if spec.rows_per_s is None else 1.0 / spec.rows_per_s
    fixed = costs.per_run_s + costs.load_compile_s  # once per accelerator (worker)
    divisible = rows * per_row + units * costs.per_unit_s + waves * costs.per_wave_s
    answer = {
        "predicted_seconds": round(predicted, 1),
        "tolerance": spec.tolerance,
        "predicted_range_seconds": [round(predicted * (1 - spec.tolerance), 1),
                                    round(predicted * (1 + spec.tolerance), 1)],
        "accelerator_hours": round((fixed + divisible) / 3600, 4),
        "deadline_seconds": spec.deadline_s,
        "accelerators_needed": 1,
        "wall_seconds_with_accelerators": round(fixed + divisible, 1),
        "price_per_hour": spec.price_per_hour,
        "cost": None,
    }
    if spec.deadline_s is not None:
        if spec.deadline_s <= fixed:
            answer["accelerators_needed"] = None
            answer["wall_seconds_with_accelerators"] = None
            answer["deadline_problem"] = (
                f"the deadline ({spec.deadline_s:g} s) is not longer than what each accelerator pays before "
                f"its first row ({fixed:.1f} s: model load and compile, pipeline start); no number of "
                "accelerators meets it")
        else:
            needed = max(1, math.ceil(divisible / (spec.deadline_s - fixed) - 1e-9))
            if needed > units:  # a unit of work runs on one worker: the job splits no finer than its units
                needed = units
                answer["deadline_problem"] = (
                    f"the job has {units} unit(s) of work, and one accelerator each ends after about "
                    f"{fixed + divisible / units:.1f} s, past the deadline ({spec.deadline_s:g} s); a smaller "
                    "--unit-size splits large files into more units")
            answer["accelerators_needed"] = needed
            answer["wall_seconds_with_accelerators"] = round(fixed + divisible / needed, 1)
            answer["accelerator_hours"] = round((needed * fixed + divisible) / 3600, 4)
    if spec.price_per_hour is not None:
        answer["cost"] = round(answer["accelerator_hours"] * spec.price_per_hour, 2)
    return answer


def assumptions(costs: Costs, *, rows: int, files: int, spec: PlanSpec, job: job_run.JobSpec) -> list[str]:
    """The plan's assumptions, in words, for the report."""
    said = [
        f"measured on this machine ({costs.device}) with Beam's embedded FnApiRunner: {costs.sample_rows:,} "
        f"sampled rows of {rows:,} ({costs.sample_failed} of them failed), spread over {files} file(s), run "
        "through the job itself",
        f"per-row time {costs.per_row_s * 1000:.3f} ms on this machine ("
        + (f"{1 / costs.per_row_s:,.0f} rows/s" if costs.per_row_s else "too small to measure") + ")",
        f"fixed costs on this machine: {costs.load_compile_s:.2f} s model load and compile in a fresh process "
        f"({costs.compiles} batch shapes, from the compilation cache this plan filled), {costs.per_run_s:.2f} s "
        f"per run, {costs.per_wave_s:.2f} s per wave of up to {job.wave_units} units, "
        f"{costs.per_unit_s * 1000:.1f} ms per unit of work",
        "predicted_seconds: the wall time of the whole job on this machine (tasks.run.run; `bulkinfer run` "
        "adds its process start), into an empty output directory; a resumed run does less",
        f"tolerance: +-{spec.tolerance:.0%}; other work on the machine, or a job whose rows differ from the "
        "sample (longer texts, more failures), moves the real figure",
    ]
    if spec.rows_per_s is not None:
        target = spec.accelerator or "the target accelerator"
        said.append(f"accelerator-hours, accelerators needed and cost use {spec.rows_per_s:g} rows/s on {target} "
                    f"(--rows-per-s, given, not measured here); fixed costs are still this machine's")
    elif spec.accelerator is not None and same_device(spec.accelerator, costs.device):
        said.append(f"--accelerator {spec.accelerator}: this machine's device ({costs.device}), so every figure "
                    "was measured on it")
    elif spec.accelerator is not None:
        said.append(f"--accelerator {spec.accelerator}: the per-row time and fixed costs are this machine's "
                    f"({costs.device}), not {spec.accelerator}'s; no speed-up is assumed.  Run `bulkinfer plan` on "
                    f"a {spec.accelerator} machine, or pass --rows-per-s measured there")
    return said


def same_device(accelerator: str, device: str) -> bool:
    """Whether an --accelerator value ("nvidia-h200", or a resource hint "type:nvidia-h200;count:1") names
    the device kind of `device` ("gpu: 1 x NVIDIA H200"), ignoring case and punctuation."""
    kind = accelerator.split("type:", 1)[1].split(";", 1)[0] if "type:" in accelerator else accelerator
    kind = re.sub(r"[^a-z0-9]", "", kind.lower())
    return bool(kind) and kind == re.sub(r"[^a-z0-9]", "", device.rsplit(" x ", 1)[-1].lower())


def plan(model, job: job_run.JobSpec, spec: PlanSpec = PlanSpec(), pipeline_args: list[str] | None = None) -> dict:
    """Sizes `job` (its input, format and unit settings; job.output is not used) for `model`.

    Returns the report: rows, files, units, waves, the measured costs, predicted_seconds and tolerance,
    accelerator_hours, accelerators_needed (for spec.deadline_s), cost (at spec.price_per_hour) and
    the assumptions.  Raises FileNotFoundError when nothing matches the input, JobFailed when the
    sample's run fails, and the model's load errors.
    """
    files = io.match_files(job.input)
    counts = [count_rows(f) for f in files]
    rows = sum(counts)
    units = plan_units(files, job.unit_size)
    waves = math.ceil(len(units) / job.wave_units)
    if not rows:
        raise ValueError(f"{job.input!r} holds no rows to plan for ({len(files)} file(s), all empty)")
    with tempfile.TemporaryDirectory(prefix="bulkinfer-plan-") as workdir:
        sample_dir = os.path.join(workdir, "sample")
        os.makedirs(sample_dir)
        sample_files = sample_rows(files, counts, spec.sample, sample_dir)
        if not sample_files:
            raise ValueError(f"{job.input!r}: no row of the input could be sampled (unreadable files?)")
        costs = measure(model, job, sample_files, workdir, pipeline_args)
    report = {
        "model": getattr(model, "name", str(model)),
        "input": job.input,
        "files": len(files),
        "rows": rows,
        "rows_per_file": dict(zip(files, counts)) if len(files) <= 20 else None,
        "units": len(units),
        "waves": waves,
        "device": costs.device,
        "accelerator": spec.accelerator,
        "rows_per_s_given": spec.rows_per_s,
        "sample_rows": costs.sample_rows,
        "measured": {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(costs).items()},
    }
    report.update(estimate(costs, rows=rows, units=len(units), waves=waves, spec=spec))
    report["assumptions"] = assumptions(costs, rows=rows, files=len(files), spec=spec, job=job)
    return report


def summary(report: dict) -> str:
    """The report as lines for a person (the CLI without --json)."""
    m = report["measured"]
    lines = [
        f"rows: {report['rows']:,} in {report['files']} file(s), {report['units']} unit(s) of work, "
        f"{report['waves']} wave(s)",
        f"measured on this machine ({report['device']}): a sample of {report['sample_rows']:,} rows, "
        f"{m['per_row_s'] * 1000:.3f} ms per row; fixed {m['load_compile_s']:.1f} s load and compile, "
        f"{m['per_run_s']:.2f} s per run, {m['per_wave_s']:.2f} s per wave, {m['per_unit_s'] * 1000:.1f} ms per unit",
        f"predicted_seconds on this machine: {report['predicted_seconds']:,.1f} s "
        f"({report['predicted_seconds'] / 3600:.2f} h), tolerance +-{report['tolerance']:.0%}",
        f"accelerator-hours: {report['accelerator_hours']:.3f}",
    ]
    if report["deadline_seconds"] is not None:
        if report["accelerators_needed"] is None:
            lines.append(f"deadline: {report['deadline_problem']}")
        else:
            lines.append(f"deadline {report['deadline_seconds']:g} s: {report['accelerators_needed']} accelerator(s), "
                         f"done in about {report['wall_seconds_with_accelerators']:,.0f} s")
            if report.get("deadline_problem"):
                lines.append(f"deadline not met: {report['deadline_problem']}")
    if report["cost"] is not None:
        lines.append(f"cost at {report['price_per_hour']:g} per accelerator-hour: {report['cost']:,.2f}")
    lines.append("assumptions:")
    lines.extend(f"  - {a}" for a in report["assumptions"])
    return "\n".join(lines)
