"""Commits per unit of work that check counts and do not depend on how the runner fuses stages.

A unit of work (`io.Unit`: a file or a range of one) is committed only when what reached the writers
reconciles with what the reader read for that unit:

    reader counts  (unit, ("read", rows, failed, Unit, host:pid))  ─┐
    predictions    -> WriteUnitParts   -> (unit, ("part", temporary file, rows))   ─┼─ GroupByKey(unit)
    dead letters   -> WriteUnitLetters -> (unit, ("failed", temporary file, rows)) ─┘        │
                                                      reconcile: rows_in == rows_out + rows_failed
                                                      commit: rename temporaries, write the record

Writers write each bundle's rows under temporary names and report them downstream; a GroupByKey on
the unit key gathers the reports, so nothing depends on the order in which rows and counts arrive or
on which stages share a worker.  A runner that retries a bundle delivers only the successful
attempt's reports; the temporaries of failed attempts (orphans) are deleted at commit.

    DIR/part-<key>-<n>.parquet     predictions of one unit
    DIR/failed-<key>-<n>.jsonl     its dead letters
    DIR/_committed/<key>.json      {"key", "source", "fingerprint", "start", "stop", "rows_in",
                                    "rows_out", "rows_failed", "files", "read_by": "host:pid"}

A unit whose counts do not reconcile raises `UnitNotReconciled` (the job fails, nothing of that unit is
committed).  When, over the job, at least `min_rows` rows were seen and more than `max_failed_fraction`
of them failed, the commit raises `TooManyFailures` instead of committing a dataset of dead letters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import NAMESPACE, Batch, in_global_window, to_json
from bulkinfer.beam.units import delete, escape_glob
from bulkinfer.beam.writers import (
    BYTES_PER_FILE,
    ShardWriter,
    commit,
    ensure_dir,
    temp_name,
    use_system_memory_pool,
    write_temp,
)

COMMITTED = "_committed"
LETTERS_PER_FILE = 10_000  # dead letters a bundle holds in memory, over all units, before writing them out


class UnitNotReconciled(RuntimeError):
    """A unit's rows_in != rows_out + rows_failed: some rows were lost or duplicated between read and write."""


class TooManyFailures(RuntimeError):
    """More than the allowed fraction of the job's rows failed: a systemic fault, not a few bad rows."""


# A job smaller than min_rows still stops when this many rows or more were seen and every one failed.
ALL_FAILED_ROWS = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailureLimit:
    """Stop the job when more than `max_fraction` of its rows failed, once at least `min_rows` were seen,
    or when every one of at least `ALL_FAILED_ROWS` rows failed (a small job is judged too).

    max_fraction 1.0 never stops.  prior_rows, prior_failed: rows of units committed before this
    pipeline (earlier waves and runs), counted with this pipeline's.
    """

    max_fraction: float = 0.5
    min_rows: int = 1000
    prior_rows: int = 0
    prior_failed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be within [0, 1], got {self.max_fraction}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")

    def check(self, rows: int, failed: int) -> None:
        rows, failed = rows + self.prior_rows, failed + self.prior_failed
        judged = rows >= self.min_rows or (failed == rows >= min(self.min_rows, ALL_FAILED_ROWS))
        if self.max_fraction < 1.0 and judged and failed > self.max_fraction * rows:
            raise TooManyFailures(
                f"{failed} of {rows} rows failed ({failed / rows:.0%}), more than --max-failed-fraction "
                f"{self.max_fraction:g}: a systemic fault (wrong --input-field? a broken model?), so nothing "
                "more is committed; fix the cause and rerun, or raise the limit")


def committed(directory: str) -> dict[str, dict]:
    """unit key -> its commit record, for every committed unit in `directory`."""
    records = {}
    pattern = FileSystems.join(escape_glob(directory), COMMITTED, "*.json")
    for m in FileSystems.match([pattern])[0].metadata_list:
        if m.path.rsplit("/", 1)[1].startswith(".tmp-"):  # a record being written (or a crash's leftover)
            continue
        with FileSystems.open(m.path) as f:
            record = json.loads(f.read())
        records[record.get("key", m.path.rsplit("/", 1)[1].removesuffix(".json"))] = record
    return records


def records_of(directory: str, keys: list[str]) -> list[dict]:
    """The commit records of these units (those committed)."""
    records = []
    for key in keys:
        path = FileSystems.join(directory, COMMITTED, f"{key}.json")
        if FileSystems.exists(path):
            with FileSystems.open(path) as f:
                records.append(json.loads(f.read()))
    return records


def forget(directory: str, records: list[dict]) -> None:
    """Deletes committed units: their commit records first (then they no longer count), then their files."""
    if not records:
        return
    delete([FileSystems.join(directory, COMMITTED, f"{r['key']}.json") for r in records])
    doomed = [FileSystems.join(directory, f) for r in records for f in r["files"]]
    doomed = [f for f in doomed if FileSystems.exists(f)]
    if doomed:
        delete(doomed)


def remove_uncommitted(directory: str) -> list[str]:
    """Deletes the outputs of units without a commit record and every temporary file; returns them."""
    keep = {f for r in committed(directory).values() for f in r["files"]}
    doomed = []
    for pattern in ("part-*", "failed-*", ".tmp-*", f"{COMMITTED}/.tmp-*"):
        for m in FileSystems.match([FileSystems.join(escape_glob(directory), pattern)])[0].metadata_list:
            if m.path.rsplit("/", 1)[1] not in keep:
                doomed.append(m.path)
    if doomed:
        delete(doomed)
    return doomed


class CommitUnits(beam.PTransform):
    """Writes and commits per unit.  Applied to (predictions, dead letters, reader counts), three PCollections.

    predictions: Batches whose `unit` is set (as ReadUnits makes them and BulkInference keeps them).
    dead letters: dicts with a "unit" field (written without it), e.g. the reader's and BulkInference's
    flattened.  counts: `io.ReadUnits`' COUNTS.
    Returns the commit records.
    """

    def __init__(self, directory: str, *, format: str, columns: list[str] | None, rows_per_file: int = 100_000,
                 limit: FailureLimit = FailureLimit()):
        super().__init__()
        self._dir, self._fmt, self._columns = directory.rstrip("/"), format, columns
        self._rows_per_file, self._limit = rows_per_file, limit

    def expand(self, inputs):
        predictions, letters, counts = inputs
        parts = predictions | "WriteParts" >> beam.ParDo(
            _WriteUnitParts(self._dir, self._fmt, self._columns, self._rows_per_file))
        failed = letters | "WriteLetters" >> beam.ParDo(_WriteUnitLetters(self._dir))
        units = ((counts, parts, failed) | "FlattenReports" >> beam.Flatten()
                 | "GroupByUnit" >> beam.GroupByKey()
                 | "Reconcile" >> beam.Map(_reconcile))
        totals = units | "Totals" >> beam.CombineGlobally(_SumCounts())
        return units | "Commit" >> beam.ParDo(
            _CommitUnit(self._dir, self._fmt, self._limit), totals=beam.pvalue.AsSingleton(totals))


def _token() -> str:
    return uuid.uuid4().hex[:12]


class _WriteUnitParts(beam.DoFn):
    """Writes a bundle's predictions per unit as temporaries as they arrive; emits (unit, ("part", temp, n)).

    Each unit's `ShardWriter` buffers about ROW_GROUP_BYTES; over all units a bundle buffers at most
    about BYTES_PER_FILE before every writer writes its rows out.  Files end at rows_per_file rows or
    BYTES_PER_FILE bytes, and with the bundle.
    """

    def __init__(self, directory, fmt, columns, rows_per_file):
        self._dir, self._fmt, self._columns, self._rows_per_file = directory, fmt, columns, rows_per_file
        self._written = Metrics.counter(NAMESPACE, "part_rows_written")

    def setup(self):
        use_system_memory_pool()
        ensure_dir(self._dir)

    def start_bundle(self):
        self._abort()  # writers a failed bundle left open
        self._writers: dict[str, ShardWriter] = {}

    def teardown(self):
        self._abort()

    def _abort(self):
        for writer in getattr(self, "_writers", {}).values():
            writer.abort()

    def process(self, batch):
        if not isinstance(batch, Batch) or batch.unit is None:
            raise TypeError(f"the unit writer takes Batches read by ReadUnits (with their unit), got {batch!r}; "
                            "a row-level step between read and write must keep the Batches")
        unit = batch.unit
        writer = self._writers.get(unit)
        if writer is None:
            writer = self._writers[unit] = ShardWriter(
                lambda: FileSystems.join(self._dir, f"part-{unit}-{_token()}.{self._fmt}"), self._fmt, self._columns,
                rows_per_file=self._rows_per_file, bytes_per_file=BYTES_PER_FILE)
        yield from self._reports(unit, writer.add(batch))
        if sum(w.buffered_bytes for w in self._writers.values()) >= BYTES_PER_FILE:  # many units in one bundle
            for key, w in self._writers.items():
                yield from self._reports(key, w.write_buffered())

    def finish_bundle(self):
        for unit, writer in list(self._writers.items()):
            done = writer.close()  # if it raises, this writer and the ones after it stay to be aborted
            del self._writers[unit]
            for report in self._reports(unit, done):
                yield in_global_window(report)

    def _reports(self, unit: str, done: list[tuple[str, str, int]]):
        for temp, _, n in done:
            self._written.inc(n)
            yield unit, ("part", temp, n)


class _WriteUnitLetters(beam.DoFn):
    """Writes a bundle's dead letters per unit as temporary JSONL files; emits (unit, ("failed", temp, n))."""

    def __init__(self, directory):
        self._dir = directory
        self._written = Metrics.counter(NAMESPACE, "failed_rows_written")

    def setup(self):
        ensure_dir(self._dir)

    def start_bundle(self):
        self._letters: dict[str, list[dict]] = {}
        self._buffered = 0  # over all units: a bundle holds at most LETTERS_PER_FILE letters in memory

    def process(self, letter: dict):
        unit = letter.get("unit") if isinstance(letter, dict) else None
        if unit is None:
            raise TypeError(f"the unit writer takes dead letters with their unit, got {letter!r}")
        self._letters.setdefault(unit, []).append({k: v for k, v in letter.items() if k != "unit"})
        self._buffered += 1
        if self._buffered >= LETTERS_PER_FILE:
            yield from self._write_all()

    def finish_bundle(self):
        for report in self._write_all():
            yield in_global_window(report)

    def _write_all(self):
        for unit, letters in self._letters.items():
            temp = write_temp(FileSystems.join(self._dir, f"failed-{unit}-{_token()}.jsonl"), letters, "jsonl")
            self._written.inc(len(letters))
            yield unit, ("failed", temp, len(letters))
        self._letters, self._buffered = {}, 0


def _reconcile(keyed) -> dict:
    """A unit's summary from everything reported for it; raises UnitNotReconciled if counts do not match."""
    key, reports = keyed
    reads = [r for r in reports if r[0] == "read"]
    parts = sorted((r[1], r[2]) for r in reports if r[0] == "part")
    failed = sorted((r[1], r[2]) for r in reports if r[0] == "failed")
    if len(reads) != 1:
        raise UnitNotReconciled(f"unit {key}: {len(reads)} reader counts arrived, expected 1; nothing committed")
    _, rows, read_failed, unit, reader = reads[0]
    rows_in, rows_out, rows_failed = rows + read_failed, sum(n for _, n in parts), sum(n for _, n in failed)
    if rows_in != rows_out + rows_failed:
        raise UnitNotReconciled(
            f"unit {key} ({unit.describe()}): rows_in {rows_in} != rows_out {rows_out} + rows_failed {rows_failed}; "
            "rows were lost or duplicated between read and write (a step that drops or repeats rows?), so this "
            "unit is not committed")
    return {"unit": unit, "read_by": reader, "rows_in": rows_in, "rows_out": rows_out, "rows_failed": rows_failed,
            "parts": [t for t, _ in parts], "failed": [t for t, _ in failed]}


def _first_error(letter_files: list[str]) -> str | None:
    """The error of the first dead letter in these (temporary) JSONL files, if any."""
    for path in letter_files:
        with FileSystems.open(path) as f:
            line = f.readline()
        if line:
            return json.loads(line)["error"]
    return None


class _SumCounts(beam.CombineFn):
    """(rows_in, rows_failed) over units' summaries."""

    def create_accumulator(self):
        return 0, 0

    def add_input(self, acc, summary):
        return acc[0] + summary["rows_in"], acc[1] + summary["rows_failed"]

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a[0] for a in accs), sum(a[1] for a in accs)

    def extract_output(self, acc):
        return acc


class _CommitUnit(beam.DoFn):
    def __init__(self, directory, fmt, limit: FailureLimit):
        self._dir, self._fmt, self._limit = directory, fmt, limit
        self._units = Metrics.counter(NAMESPACE, "units_committed")

    def setup(self):
        ensure_dir(FileSystems.join(self._dir, COMMITTED))

    def process(self, summary: dict, totals):
        try:
            self._limit.check(*totals)
        except TooManyFailures as e:  # quote a dead letter: they are not committed, so the user sees none
            example = _first_error(summary["failed"])
            raise TooManyFailures(f"{e}; for example: {example}" if example else str(e)) from None
        unit = summary["unit"]
        key = unit.key
        record_path = FileSystems.join(self._dir, COMMITTED, f"{key}.json")
        temps = summary["parts"] + summary["failed"]
        if FileSystems.exists(record_path):  # a retried commit: the first one stands
            leftover = [t for t in temps if FileSystems.exists(t)]
            if leftover:
                delete(leftover)
            return
        finals = [FileSystems.join(self._dir, f"part-{key}-{i:05d}.{self._fmt}") for i in range(len(summary["parts"]))]
        finals += [FileSystems.join(self._dir, f"failed-{key}-{i:05d}.jsonl") for i in range(len(summary["failed"]))]
        for temp, final in zip(temps, finals):
            if FileSystems.exists(temp):
                commit(temp, final)
            elif not FileSystems.exists(final):  # neither: a file was lost
                raise UnitNotReconciled(f"unit {key} ({unit.describe()}): written file {temp} is gone; not committed")
        self._remove_orphans(key, set(temps))
        record = {"key": key, "source": unit.source, "fingerprint": unit.fingerprint, "start": unit.start,
                  "stop": unit.stop, "rows_in": summary["rows_in"], "rows_out": summary["rows_out"],
                  "rows_failed": summary["rows_failed"], "files": [f.rsplit("/", 1)[1] for f in finals],
                  "read_by": summary["read_by"]}
        with FileSystems.create(temp_name(record_path)) as f:
            f.write(json.dumps(record).encode("utf-8"))
        commit(temp_name(record_path), record_path)
        self._units.inc()
        yield record

    def _remove_orphans(self, key: str, reported: set[str]) -> None:
        """Temporaries of this unit that no successful bundle reported: left by attempts the runner retried."""
        orphans = [m.path for kind in ("part", "failed")
                   for m in FileSystems.match([FileSystems.join(escape_glob(self._dir), f".tmp-{kind}-{key}-*")])[0].metadata_list
                   if m.path not in reported]
        if orphans:
            delete(orphans)


def count_duplicate_ids(paths: list[str], id_field: str, *, buckets: int = 256, runner=None, options=None) -> int:
    """Ids that occur more than once (each extra occurrence counts 1) in output and dead-letter files.

    Each id is hashed (64 bits of BLAKE2b of its text).  Ids compare by their text (7 and "7" are one
    id: a Parquet column of mixed types stores numbers as text).  Null ids are not counted.
    paths: part-*.parquet / part-*.jsonl / failed-*.jsonl files.

    With neither `runner` nor `options` (what `bulkinfer.tasks.run` does), the hashes are counted in this
    process: 8 bytes per id, plus one file's ids as Python objects at a time.  Otherwise a Beam pipeline
    on that runner counts them keyed: each file's hashes go to one of `buckets` keys, whose duplicates
    are counted apart, so no worker holds all ids.
    """
    if not paths:
        return 0
    if runner is None and options is None:
        hashes = np.concatenate([_id_hashes(path, id_field) for path in paths])
        hashes.sort()
        return int(np.count_nonzero(hashes[1:] == hashes[:-1]))
    p = beam.Pipeline(runner=runner, options=options)
    _ = (p | "Files" >> beam.Create(sorted(paths))
         | "Hash" >> beam.FlatMap(_bucketed_id_hashes, id_field, buckets)
         | "Group" >> beam.GroupByKey()
         | "Count" >> beam.Map(_count_duplicates))
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("duplicate_ids"))["counters"]
    return int(sum((c.committed if c.committed is not None else c.attempted) or 0 for c in counters))


def _ids_of(path: str, id_field: str) -> list:
    name = path.rsplit("/", 1)[1]
    if name.endswith(".parquet"):
        with FileSystems.open(path) as f:
            return pq.read_table(f, columns=[id_field]).column(id_field).to_pylist()
    field = "id" if name.startswith("failed-") else id_field  # dead letters keep the id as "id"
    with FileSystems.open(path) as f:
        return [json.loads(line).get(field) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def _id_hashes(path: str, id_field: str) -> np.ndarray:
    """[N] uint64: 64 bits of BLAKE2b of the text of each non-null id in one file."""
    texts = (i if isinstance(i, str) else to_json(i) for i in _ids_of(path, id_field) if i is not None)
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for t in texts], np.uint64)


def _bucketed_id_hashes(path: str, id_field: str, buckets: int):
    hashes = _id_hashes(path, id_field)
    if not len(hashes):
        return
    keys = hashes % np.uint64(buckets)
    for k in np.unique(keys):
        yield int(k), hashes[keys == k]


_duplicates = Metrics.counter(NAMESPACE, "duplicate_ids")


def _count_duplicates(keyed):
    _, arrays = keyed
    hashes = np.concatenate(list(arrays))
    n = len(hashes) - len(np.unique(hashes))
    _duplicates.inc(n)
    return n
