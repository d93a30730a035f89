"""`BulkInference`: the PTransform that runs a model over a PCollection of rows or batches.

    with beam.Pipeline() as p:
        (p | bulkinfer.io.ReadDataset("data/*.jsonl")
           | beam.ParDo(MyPreprocess())
           | bulkinfer.BulkInference(bulkinfer.TextEmbedder.from_name("minilm"),
                                     accelerator="type:nvidia-h200;count:1", min_ram="16GB")
           | beam.ParDo(MyPostprocess())
           | bulkinfer.io.WriteDataset("out/"))

The model is a hashable spec with `load()`, `name` and `output_name`; the loaded model has
`predict(values)`, `input_type` and `output_name` (see `TextEmbedder`, `testing.CountingModel`).  It is loaded once per worker process in `DoFn.setup` and shared
by all of that process's DoFn threads.  With `server="http://host:port"` the model runs on an Open
Inference Protocol server instead (`bulkinfer serve`, Triton, ...; see `bulkinfer.serve.RemoteModel`).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from bulkinfer.beam import progress
from bulkinfer.beam.batch import FAILED, NAMESPACE, Batch, Rebatch, dead_letter, missing_ids
from bulkinfer.beam.inputs import row_inputs
from bulkinfer.beam.isolate import predict_isolating
from bulkinfer.beam.loading import load_shared, report_engine_stats, report_load
from bulkinfer.beam.outputs import attach
from bulkinfer.runtime import EngineStats


class BulkInference(beam.PTransform):
    """Runs `model` on field `input_field` of each row and adds the prediction as `output_field`.

    Input elements are dict rows or `Batch`es; output elements are of the same kind.  Rows whose input
    is missing or of the wrong type, or on which the model fails, are dead letters: by default the
    pipeline fails on the first one; after `.with_exception_handling()` the transform returns
    `(predictions, dead_letters)` and the job goes on.

    input_field: the row field the model reads.  id_field: the field named in dead letters' errors.
    output_field: where the prediction goes (default: the model's `output_name`, e.g. "embedding").
    accelerator, min_ram: Beam resource hints for the inference stage, e.g.
      accelerator="type:nvidia-h200;count:1;install-nvidia-driver", min_ram="16GB".
    flush_rows: rows gathered (per bundle) before the engine runs them; more rows -> less padding.
    server, server_token: run `model` (by its name) on this v2 server instead of loading it here.
    allow_missing_ids: predict rows whose `id_field` is missing or null too (by default each is a dead
      letter: its prediction could not be joined back to its input).
    """

    def __init__(
        self,
        model,
        *,
        accelerator: str | None = None,
        min_ram: str | None = None,
        input_field: str = "text",
        id_field: str | None = "id",
        output_field: str | None = None,
        flush_rows: int = 8192,
        server: str | None = None,
        server_token: str | None = None,
        allow_missing_ids: bool = False,
    ):
        super().__init__()
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        if server_token is not None and server is None:
            raise ValueError("server_token needs server=URL")
        if server is not None:
            from bulkinfer.serve.client import RemoteModel

            model = RemoteModel.for_model(server, model, token=server_token)
        self._model = model
        self._hints = {k: v for k, v in (("accelerator", accelerator), ("min_ram", min_ram)) if v}
        self._fields = dict(input_field=input_field, id_field=id_field, output_field=output_field,
                            allow_missing_ids=allow_missing_ids)
        self._flush_rows = flush_rows
        self._dead_letters = False

    def with_exception_handling(self) -> BulkInference:
        """Return (predictions, dead_letters) instead of failing on a bad row."""
        self._dead_letters = True
        return self

    def expand(self, pcoll):
        infer = beam.ParDo(_InferDoFn(self._model, flush_rows=self._flush_rows, **self._fields))
        infer = infer.with_outputs(FAILED, main="predictions")
        if self._hints:
            infer = infer.with_resource_hints(**self._hints)
        result = pcoll | "Rebatch" >> beam.ParDo(Rebatch()) | "Infer" >> infer
        if self._dead_letters:
            return result.predictions, result[FAILED]
        _ = result[FAILED] | "FailOnDeadLetter" >> beam.Map(_fail)
        return result.predictions


def _in_global_window(value) -> WindowedValue:
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def _fail(letter: dict):
    raise ValueError(
        f"{letter['error']} (stage {letter['stage']}); use BulkInference(...).with_exception_handling() "
        "to send bad rows to a dead-letter output instead of failing the job"
    )


class _InferDoFn(beam.DoFn):
    """Gathers rows until `flush_rows` are pending, runs the model once over all of them, and emits the
    predicted batches and, on FAILED, a dead letter per row that was bad or that the model failed on."""

    def __init__(self, model, *, input_field, id_field, output_field, flush_rows, allow_missing_ids=False):
        self._model = model
        self._check_ids = id_field is not None and not allow_missing_ids
        self._input_field, self._id_field = input_field, id_field
        self._output_field = output_field
        self._flush_rows = flush_rows
        self._rows_in = Metrics.counter(NAMESPACE, "infer_rows_in")
        self._rows_out = Metrics.counter(NAMESPACE, "infer_rows_out")
        self._failed = Metrics.counter(NAMESPACE, "infer_rows_failed")

    def setup(self):
        self._loaded = load_shared(self._model)
        self._output = self._output_field or self._loaded.output_name

    def start_bundle(self):
        report_load(self._model)
        # (batch, valid row indices or None for all rows, their values)
        self._pending: list[tuple[Batch, list[int] | None, list]] = []
        self._pending_rows = 0

    def process(self, batch: Batch):
        self._rows_in.inc(len(batch))
        valid, values, bad = row_inputs(batch, self._input_field, self._loaded.input_type)
        if self._check_ids:
            valid, values, bad = self._without_missing_ids(batch, valid, values, bad)
        for i, error in bad:
            yield self._letter(batch, i, error)
        self._pending.append((batch, valid, values))
        self._pending_rows += len(values)
        if self._pending_rows >= self._flush_rows:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, _in_global_window(out.value))
            else:
                yield _in_global_window(out)

    def _without_missing_ids(self, batch: Batch, valid, values, bad):
        """row_inputs' (valid, values, bad) with rows lacking an id moved to bad."""
        missing = missing_ids(batch, self._id_field)
        if not missing:
            return valid, values, bad
        error = f"field {self._id_field!r} (the id) is missing or null; set --id-field, or --allow-missing-ids"
        drop = set(missing)
        indices = range(len(batch)) if valid is None else valid
        kept = [(i, v) for i, v in zip(indices, values) if i not in drop]
        already = {i for i, _ in bad}
        bad = sorted(bad + [(i, error) for i in missing if i not in already])
        return [i for i, _ in kept], [v for _, v in kept], bad

    def _letter(self, batch: Batch, i: int, error: str, stage: str = "inference"):
        self._failed.inc()
        row = batch.row(i)
        row_id = row.get(self._id_field) if isinstance(row, dict) and self._id_field else None
        where = batch.where(i) + (f" (id {row_id!r})" if row_id is not None else "")
        pos = batch.positions[i] if batch.positions is not None else None
        letter = dead_letter(stage=stage, error=f"{where}: {error}", record=row, row_id=row_id, source=batch.source,
                             position=pos, unit=batch.unit)
        return beam.pvalue.TaggedOutput(FAILED, letter)

    def _flush(self):
        pending, self._pending, self._pending_rows = self._pending, [], 0
        values = [v for _, _, vs in pending for v in vs]
        if not values:  # every pending row was a dead letter
            progress.advance(sum(len(b) for b, _, _ in pending))
            return
        stats = EngineStats()
        preds, errors = predict_isolating(self._loaded, values, stats)
        report_engine_stats(stats)
        k = 0
        for batch, valid, vs in pending:
            out, failed = attach(batch, valid, preds, errors, k, self._output)
            for i, error in failed:
                yield self._letter(batch, i, error)
            k += len(vs)
            self._rows_out.inc(len(out))
            progress.advance(len(batch))
            if batch.from_rows:
                yield from out.rows
            elif len(out):
                yield out
