"""`Guarded`: a user's row-level DoFn whose failures become dead letters instead of failing the job.

    rows, pre_failed = rows | "Preprocess" >> bulkinfer.Guarded(MyPreprocess(), stage="preprocess")

Built on Beam's `ParDo(...).with_exception_handling()`; each failing row becomes a dead letter in the
same shape BulkInference and ReadDataset use: id, stage, error, record.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import NAMESPACE, dead_letter

STAGES = ("preprocess", "postprocess")


class Guarded(beam.PTransform):
    """Runs `fn` on rows as `beam.ParDo` does (a DoFn, or a callable returning an iterable of outputs);
    returns (outputs, dead_letters)."""

    def __init__(self, fn, *, stage: str = "preprocess", id_field: str | None = "id"):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self._fn, self._stage, self._id_field = fn, stage, id_field

    def expand(self, pcoll):
        good, bad = pcoll | "Run" >> beam.ParDo(self._fn).with_exception_handling()
        letters = bad | "DeadLetter" >> beam.Map(_letter, self._stage, self._id_field)
        return good, letters


def _letter(failure, stage: str, id_field: str | None) -> dict:
    row, (_exc_type, exc_repr, _traceback) = failure
    Metrics.counter(NAMESPACE, f"{stage}_rows_failed").inc()
    row_id = row.get(id_field) if isinstance(row, dict) and id_field else None
    where = f"id {row_id!r}" if row_id is not None else "a row"
    return dead_letter(stage=stage, error=f"{where}: {exc_repr}", record=row, row_id=row_id)
