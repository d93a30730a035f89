"""Per-input-file commits: atomic outputs and resumable jobs.

Each input file (a "source") is one unit of work.  Its predictions and dead letters are written under
temporary names while the file flows through the pipeline; when its `SourceDone` marker arrives, the
files are renamed into place and then a commit record `_committed/<key>.json` is written (itself by
rename).  A source counts as done only once its record exists:

    DIR/part-<key>-<n>.parquet     predictions of one source
    DIR/failed-<key>.jsonl         its dead letters
    DIR/_committed/<key>.json      {"source", "rows_in", "rows_out", "rows_failed", "files"}

A rerun with the same output directory skips the committed sources, deletes whatever a killed run left
of the others (temporary files, or final names renamed before the record was written), and processes
only those.  A retried bundle finds the record already there and discards its duplicate output.
"""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import NAMESPACE, Batch, SourceDone
from bulkinfer.beam.io import ShardBuffer, commit, ensure_dir, temp_name, write_temp

COMMITTED = "_committed"


def source_key(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:16]


def committed(directory: str) -> dict[str, dict]:
    """source path -> its commit record, for every committed source in `directory`."""
    records = {}
    pattern = FileSystems.join(directory, COMMITTED, "*.json")
    for m in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(m.path) as f:
            record = json.loads(f.read())
        records[record["source"]] = record
    return records


def remove_uncommitted(directory: str) -> list[str]:
    """Deletes the outputs of sources without a commit record and every temporary file; returns them."""
    keep = {f for r in committed(directory).values() for f in r["files"]}
    doomed = []
    for pattern in ("part-*", "failed-*", ".tmp-*", f"{COMMITTED}/.tmp-*"):
        for m in FileSystems.match([FileSystems.join(directory, pattern)])[0].metadata_list:
            if m.path.rsplit("/", 1)[1] not in keep:
                doomed.append(m.path)
    if doomed:
        FileSystems.delete(doomed)
    return doomed


class CommitShards(beam.PTransform):
    """Writes predictions (Batches) per source and, at its `SourceDone`, its dead letters; then commits."""

    def __init__(self, directory: str, *, format: str, columns: list[str] | None, rows_per_file: int = 100_000):
        super().__init__()
        self._args = dict(directory=directory.rstrip("/"), fmt=format, columns=columns, rows_per_file=rows_per_file)

    def expand(self, pcoll):
        return pcoll | "Commit" >> beam.ParDo(_CommitDoFn(**self._args))


class _Pending:
    """What one source has written so far: temporary files, their final names, and counts."""

    def __init__(self, columns: list[str] | None):
        self.rows = ShardBuffer(columns)  # not yet written (tables or dict rows)
        self.failed: list[dict] = []  # dead letters, from the marker
        self.temps: list[tuple[str, str]] = []  # (temporary, final)
        self.rows_out = 0


class _CommitDoFn(beam.DoFn):
    def __init__(self, *, directory, fmt, columns, rows_per_file):
        self._dir, self._fmt, self._columns, self._rows_per_file = directory, fmt, columns, rows_per_file
        self._rows_written = Metrics.counter(NAMESPACE, "part_rows_written")
        self._failed_written = Metrics.counter(NAMESPACE, "failed_rows_written")
        self._sources = Metrics.counter(NAMESPACE, "sources_committed")

    def setup(self):
        ensure_dir(FileSystems.join(self._dir, COMMITTED))

    def start_bundle(self):
        self._pending: dict[str, _Pending] = {}

    def process(self, element):
        if isinstance(element, SourceDone):
            yield from self._commit(element)
        elif isinstance(element, Batch):
            p = self._of(element.source)
            p.rows.add(element)
            if len(p.rows) >= self._rows_per_file:
                self._spill(element.source, p)
        else:
            raise TypeError(f"CommitShards takes Batches and SourceDone markers, got {type(element).__name__}")

    def finish_bundle(self):
        leftover = [s for s, p in self._pending.items() if len(p.rows) or p.temps]
        if leftover:  # a source whose marker never came: nothing of it is committed, nothing claimed done
            raise RuntimeError(f"outputs of {leftover[:3]} arrived without their end-of-file marker")

    def _of(self, source: str | None) -> _Pending:
        if source is None:
            raise ValueError("CommitShards needs rows that carry their source file (ReadDataset(markers=True))")
        return self._pending.setdefault(source, _Pending(self._columns))

    def _spill(self, source: str, p: _Pending):
        final = FileSystems.join(self._dir, f"part-{source_key(source)}-{len(p.temps):05d}.{self._fmt}")
        p.rows_out += len(p.rows)
        p.temps.append((p.rows.write_temp(final, self._fmt), final))

    def _commit(self, done: SourceDone):
        p = self._pending.pop(done.source, _Pending(self._columns))
        p.failed = list(done.letters)
        key = source_key(done.source)
        record_path = FileSystems.join(self._dir, COMMITTED, f"{key}.json")
        if FileSystems.exists(record_path):  # a retried bundle: the first commit stands
            FileSystems.delete([t for t, _ in p.temps])
            return
        if len(p.rows):
            self._spill(done.source, p)
        if p.failed:
            final = FileSystems.join(self._dir, f"failed-{key}.jsonl")
            p.temps.append((write_temp(final, p.failed, "jsonl"), final))
        for temp, final in p.temps:
            commit(temp, final)
        record = {
            "source": done.source,
            "rows_in": done.rows + done.failed,
            "rows_out": p.rows_out,
            "rows_failed": len(p.failed),
            "files": [final.rsplit("/", 1)[1] for _, final in p.temps],
        }
        with FileSystems.create(temp_name(record_path)) as f:
            f.write(json.dumps(record).encode("utf-8"))
        commit(temp_name(record_path), record_path)
        self._rows_written.inc(p.rows_out)
        self._failed_written.inc(len(p.failed))
        self._sources.inc()
        yield record
