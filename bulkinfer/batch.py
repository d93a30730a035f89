"""The element that flows between bulkinfer's stages: a batch of rows, not one row.

Beam's Python runners pay about 100 us per element, so read, infer and write move `Batch`es of
hundreds or thousands of rows.  A user's own row-level DoFn can sit between them: `BulkInference`
and `WriteDataset` accept plain dict rows too (see `Rebatch`), and `Unbatch` turns batches into rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

FAILED = "failed"  # tag of every dead-letter output


@dataclasses.dataclass
class Batch:
    """rows: dicts.  source: the file they came from, if any.  positions: each row's 1-based line or
    row number in that file (for error messages).  from_rows: built from single-row elements, so
    BulkInference hands single rows back."""

    rows: list[dict]
    source: str | None = None
    positions: Sequence[int] | None = None
    from_rows: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """Where row i came from, for error messages: 'data/a.jsonl line 7' or 'row 3'."""
        pos = self.positions[i] if self.positions is not None else i + 1
        if not self.source:
            return f"row {pos}"
        unit = "row" if self.source.lower().endswith(".parquet") else "line"
        return f"{self.source} {unit} {pos}"

    def take(self, indices: Iterable[int], rows: list[dict] | None = None) -> Batch:
        """A batch of the given rows (or replacement rows), keeping their positions."""
        indices = list(indices)
        positions = [self.positions[i] for i in indices] if self.positions is not None else [i + 1 for i in indices]
        return Batch(
            rows if rows is not None else [self.rows[i] for i in indices],
            source=self.source, positions=positions, from_rows=self.from_rows,
        )


@dataclasses.dataclass(frozen=True)
class SourceDone:
    """Follows the last rows of one input file down the main output (only with ReadDataset(markers=True)).

    Stages that buffer rows flush them before passing the marker on, and every stage adds the dead
    letters it made for that file to `letters`; so when the marker reaches the writer, everything the
    file produced has arrived and its outputs can be committed as one unit.  Rows and marker travel one
    chain of ParDos (no Flatten, whose inputs a runner may deliver in any order).
    rows: rows read; failed: records the reader could not parse.
    """

    source: str
    rows: int
    failed: int
    letters: tuple = ()

    def with_letters(self, letters) -> SourceDone:
        return dataclasses.replace(self, letters=self.letters + tuple(letters))


def dead_letter(*, stage: str, error: str, record: Any, row_id: Any = None, source: str | None = None,
                position: int | None = None) -> dict:
    """One failed row: where it failed, why, and the raw record as it arrived."""
    return {"id": row_id, "stage": stage, "error": error, "record": record, "source": source, "position": position}


def to_json(obj: Any) -> str:
    """JSON for rows and dead letters, whatever they hold (numpy arrays become lists, bytes are decoded)."""
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, bytes | bytearray):
        return o.decode("utf-8", errors="replace")
    return str(o)


class Rebatch(beam.DoFn):
    """Passes `Batch`es through; gathers single dict rows into batches of up to `rows` rows per bundle."""

    def __init__(self, rows: int = 1024):
        self._size = rows
        self._buf: list[dict] = []

    def start_bundle(self):
        self._buf = []

    def process(self, element):
        if isinstance(element, Batch | SourceDone):
            yield element
            return
        self._buf.append(element)
        if len(self._buf) >= self._size:
            yield Batch(self._buf, from_rows=True)
            self._buf = []

    def finish_bundle(self):
        if self._buf:
            yield WindowedValue(Batch(self._buf, from_rows=True), MIN_TIMESTAMP, [GlobalWindow()])
            self._buf = []


class Unbatch(beam.PTransform):
    """Batches -> single rows, for a row-level DoFn of the user's."""

    def expand(self, pcoll):
        return pcoll | beam.FlatMap(_rows_of)


def _rows_of(element) -> list:
    if isinstance(element, Batch):
        return element.rows
    return [] if isinstance(element, SourceDone) else [element]
