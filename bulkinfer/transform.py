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

import threading
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from bulkinfer import progress
from bulkinfer.batch import FAILED, NAMESPACE, Batch, Rebatch, SourceDone, dead_letter
from bulkinfer.errors import ModelUnavailable
from bulkinfer.runtime import EngineStats

_loaded: dict[Any, Any] = {}
_load_unreported: set = set()  # loaded models whose load time no bundle has reported yet
_loaded_lock = threading.Lock()


def load_shared(model) -> Any:
    """The process's one loaded instance of `model` (a hashable spec); loads it on first use."""
    with _loaded_lock:
        if model not in _loaded:
            _loaded[model] = model.load()
            _load_unreported.add(model)
        return _loaded[model]


def _report_load(model) -> None:
    """Records the model's load time once per load, from a bundle (metrics need a step context; setup has none)."""
    with _loaded_lock:
        if model not in _load_unreported:
            return
        _load_unreported.discard(model)
    Metrics.distribution(NAMESPACE, "model_load_ms").update(int(getattr(_loaded[model], "load_s", 0.0) * 1000))


def report_engine_stats(stats: EngineStats) -> None:
    """Adds one engine call's counts to the Beam metrics that report.json reads (once per flush, not per row)."""
    for name in ("batches", "real_tokens", "padded_tokens", "compiles", "oom_backoffs"):
        Metrics.counter(NAMESPACE, name).inc(getattr(stats, name))
    Metrics.counter(NAMESPACE, "engine_ms").inc(int(stats.run_s * 1000))  # wall time inside engine calls
    Metrics.counter(NAMESPACE, "device_busy_ms").inc(int(stats.busy_s * 1000))


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
        self._fields = dict(input_field=input_field, id_field=id_field, output_field=output_field)
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
    def __init__(self, model, *, input_field, id_field, output_field, flush_rows):
        self._model = model
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
        _report_load(self._model)
        # (batch, valid row indices or None for all rows, their values)
        self._pending: list[tuple[Batch, list[int] | None, list]] = []
        self._pending_rows = 0
        self._letters: dict[str, list] = {}  # source -> dead letters made here, for its SourceDone

    def process(self, batch: Batch | SourceDone):
        if isinstance(batch, SourceDone):  # all rows of that file must leave before the marker
            yield from self._flush()
            yield batch.with_letters(self._letters.pop(batch.source, ()))
            return
        self._rows_in.inc(len(batch))
        if batch.table is not None:
            valid, values, bad = self._check_table(batch.table)
            for i, error in bad:
                yield self._letter(batch, i, error)
        else:
            valid, values = [], []
            for i, row in enumerate(batch.rows):
                error = self._check(row)
                if error is None:
                    valid.append(i)
                    values.append(row[self._input_field])
                else:
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

    def _check(self, row) -> str | None:
        field = self._input_field
        if not isinstance(row, dict):
            return f"expected a dict row, got {type(row).__name__}"
        if field not in row:
            return f"field {field!r} is missing"
        return self._type_error(row[field])

    def _type_error(self, value) -> str | None:
        want = self._loaded.input_type
        if isinstance(value, want):
            return None
        got = "null" if value is None else type(value).__name__
        return f"field {self._input_field!r} is {got}, expected {want.__name__}"

    def _check_table(self, table: pa.Table) -> tuple[list[int] | None, list, list[tuple[int, str]]]:
        """(valid row indices, None if all; their values; (row, error) for the others), as `_check` per row."""
        field = self._input_field
        if field not in table.column_names:
            return [], [], [(i, f"field {field!r} is missing") for i in range(table.num_rows)]
        column = table.column(field)
        values = column.to_pylist()  # the model's input: one Python object per row is unavoidable
        if self._loaded.input_type is str and _is_text(column.type):
            if not column.null_count:
                return None, values, []
            bad = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)).tolist()
        else:
            bad = [i for i, v in enumerate(values) if self._type_error(v) is not None]
        if not bad:
            return None, values, []
        ok = np.ones(table.num_rows, bool)
        ok[bad] = False
        valid = np.flatnonzero(ok).tolist()
        return valid, [values[i] for i in valid], [(i, self._type_error(values[i])) for i in bad]

    def _letter(self, batch: Batch, i: int, error: str, stage: str = "inference"):
        self._failed.inc()
        row = batch.row(i)
        row_id = row.get(self._id_field) if isinstance(row, dict) and self._id_field else None
        where = batch.where(i) + (f" (id {row_id!r})" if row_id is not None else "")
        pos = batch.positions[i] if batch.positions is not None else None
        letter = dead_letter(
            stage=stage, error=f"{where}: {error}", record=row, row_id=row_id, source=batch.source, position=pos)
        if batch.source is not None:
            self._letters.setdefault(batch.source, []).append(letter)
        return beam.pvalue.TaggedOutput(FAILED, letter)

    def _flush(self):
        pending, self._pending, self._pending_rows = self._pending, [], 0
        values = [v for _, _, vs in pending for v in vs]
        if not values:  # every pending row was a dead letter
            progress.advance(sum(len(b) for b, _, _ in pending))
            return
        stats = EngineStats()
        preds, errors = _predict_isolating(self._loaded, values, stats)
        report_engine_stats(stats)
        k = 0
        for batch, valid, vs in pending:
            if batch.table is not None:
                out = yield from self._table_outputs(batch, valid, preds, errors, k)
            else:
                out = yield from self._dict_outputs(batch, valid, preds, errors, k)
            k += len(vs)
            self._rows_out.inc(len(out))
            progress.advance(len(batch))
            yield from self._emit(out)

    def _dict_outputs(self, batch: Batch, valid: list[int], preds, errors: dict[int, str], k: int):
        """Yields the dead letters of rows the model failed on; returns the batch of the others."""
        keep, rows = [], []
        for i in valid:
            if k in errors:
                yield self._letter(batch, i, f"model failed: {errors[k]}")
            else:
                keep.append(i)
                rows.append({**batch.rows[i], self._output: preds[k]})
            k += 1
        return batch.take(keep, rows)

    def _table_outputs(self, batch: Batch, valid: list[int] | None, preds, errors: dict[int, str], k: int):
        """As `_dict_outputs` for a table batch: its table, filtered, plus the prediction column."""
        keep = np.arange(len(batch)) if valid is None else np.asarray(valid, np.int64)  # [n]
        ok = np.ones(len(keep), bool)
        for j in (j for j in errors if k <= j < k + len(keep)):
            ok[j - k] = False
            yield self._letter(batch, int(keep[j - k]), f"model failed: {errors[j]}")
        keep = keep[ok]
        if len(keep) == 0:
            return batch.take([])
        table = batch.take(keep).table
        column = _arrow_column(preds[k:k + len(ok)][ok])
        if self._output in table.column_names:
            table = table.set_column(table.column_names.index(self._output), self._output, column)
        else:
            table = table.append_column(self._output, column)
        return batch.take(keep, table)

    @staticmethod
    def _emit(batch: Batch):
        if batch.from_rows:
            yield from batch.rows
        elif len(batch):
            yield batch


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _arrow_column(preds: np.ndarray) -> pa.Array:
    """[N] -> a plain column; [N, D] -> fixed-size lists of D (nested for more dimensions); no per-row Python."""
    column = pa.array(preds.reshape(-1) if preds.ndim > 1 else preds)
    for size in reversed(preds.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def _predict_isolating(loaded, values: list, stats: EngineStats):
    """Predictions for all values; if the model fails, bisect until the failing values are isolated.

    Returns (predictions indexed like values, {index: error text} for values that failed alone).
    """
    errors: dict[int, str] = {}
    out: np.ndarray | None = None

    def attempt(lo: int, hi: int):
        nonlocal out
        try:
            part = loaded.predict(values[lo:hi], stats=stats)
        except ModelUnavailable as e:  # not these rows' fault (a server down): bisecting cannot help
            errors.update({i: f"{type(e).__name__}: {e}" for i in range(lo, hi)})
            return
        except Exception as e:  # any model failure: isolate it, never lose the rest
            if hi - lo == 1:
                errors[lo] = f"{type(e).__name__}: {e}"
                return
            mid = (lo + hi) // 2
            attempt(lo, mid)
            attempt(mid, hi)
            return
        if out is None:
            out = np.empty((len(values),) + part.shape[1:], part.dtype)
        out[lo:hi] = part

    attempt(0, len(values))
    return out, errors
