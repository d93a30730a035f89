"""`BulkInference`: the PTransform that runs a model over a PCollection of rows or batches.

    with beam.Pipeline() as p:
        (p | bulkinfer.io.ReadDataset("data/*.jsonl")
           | beam.ParDo(MyPreprocess())
           | bulkinfer.BulkInference(bulkinfer.TextEmbedder.from_name("minilm"),
                                     accelerator="type:nvidia-h200;count:1", min_ram="16GB")
           | beam.ParDo(MyPostprocess())
           | bulkinfer.io.WriteDataset("out/"))

The model is a built-in name, a model directory, or a spec (`TextEmbedder`, `JaxModel`, `RemoteModel`;
the contract is in `bulkinfer.models.signature`).  It is loaded once per worker process in `DoFn.setup`
and shared by all of that process's DoFn threads.  With `server="http://host:port"` the model runs on an Open
Inference Protocol server instead (`bulkinfer serve`, Triton, ...; see `bulkinfer.serve.RemoteModel`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from bulkinfer.beam import progress
from bulkinfer.beam.batch import FAILED, NAMESPACE, Batch, Rebatch, dead_letter, in_global_window
from bulkinfer.beam.inputs import model_inputs
from bulkinfer.beam.isolate import predict_isolating
from bulkinfer.beam.loading import load_shared, report_engine_stats, report_load
from bulkinfer.beam.outputs import absent_fields, attach
from bulkinfer.errors import BadSettings
from bulkinfer.models.resolve import model_spec
from bulkinfer.runtime import EngineStats
from bulkinfer.runtime.process import share_accelerator_memory

log = logging.getLogger(__name__)


class BulkInference(beam.PTransform):
    """Runs `model` on each row's input fields and adds one field per model output.

    Input elements are dict rows or `Batch`es; output elements are of the same kind.  Rows whose input
    is missing or of the wrong type, shape or dtype, or on which the model fails, are dead letters: by
    default the pipeline fails on the first one; after `.with_exception_handling()` the transform returns
    `(predictions, dead_letters)` and the job goes on.

    model: a built-in name (`minilm`, `digits`, `smollm2`), a model directory or GGUF file (any Beam
      filesystem), or a model spec such as `JaxModel(fn, params=..., inputs=...)` or
      `Generator(LanguageModel..., sampling=...)`; a decoder LM given by name or path generates greedily
      (`Generator`'s defaults).  Anything else raises ValueError here, not on a worker.
    input_field: the row field a single-input model reads (default: the input's name, "text" for text
      models).  Models with several inputs read the fields named like their inputs.
    output_field: the row field a single-output model writes (default: the output's name, e.g.
      "embedding"); several outputs are written under their own names.
    keep_fields: the input fields output rows keep beside the predictions (and `id_field`); None keeps all.
    id_field: the field named in dead letters' errors.
    accelerator, min_ram: Beam resource hints for the inference stage, e.g.
      accelerator="type:nvidia-h200;count:1;install-nvidia-driver", min_ram="16GB".
    flush_rows: rows gathered (per bundle) before the engine runs them; more rows -> less padding.
    server, server_token: run `model` (by its name) on this v2 server instead of loading it here.
    allow_missing_ids: predict rows whose `id_field` is missing or null too (by default each is a dead
      letter: its prediction could not be joined back to its input).
    processes_per_accelerator: SDK processes that share each GPU on a worker; each one's JAX then
      preallocates 0.9/N of its memory (`bulkinfer.runtime.process.share_accelerator_memory`, set in
      DoFn.setup before the model loads).  Default: the worker's $BULKINFER_PROCESSES_PER_ACCELERATOR, else 1.
    """

    def __init__(
        self,
        model,
        *,
        accelerator: str | None = None,
        min_ram: str | None = None,
        input_field: str | None = None,
        id_field: str | None = "id",
        output_field: str | None = None,
        keep_fields: Sequence[str] | None = None,
        flush_rows: int = 8192,
        server: str | None = None,
        server_token: str | None = None,
        allow_missing_ids: bool = False,
        processes_per_accelerator: int | None = None,
    ):
        super().__init__()
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        if processes_per_accelerator is not None and processes_per_accelerator < 1:
            raise ValueError(f"processes_per_accelerator must be >= 1, got {processes_per_accelerator}")
        if server_token is not None and server is None:
            raise ValueError("server_token needs server=URL")
        if server is not None:
            from bulkinfer.serve.remote_model import RemoteModel

            model = RemoteModel.for_model(server, model, token=server_token)
        else:
            model = model_spec(model)
            from bulkinfer.models.lm import LanguageModel

            if isinstance(model, LanguageModel):  # a decoder LM by name or path: greedy generation
                from bulkinfer.models.generator import Generator

                model = Generator(model=model)
        if keep_fields is not None:
            keep_fields = list(dict.fromkeys(([id_field] if id_field else []) + list(keep_fields)))
        self._model = model
        self._hints = {k: v for k, v in (("accelerator", accelerator), ("min_ram", min_ram)) if v}
        self._fields = dict(input_field=input_field, id_field=id_field, output_field=output_field,
                            keep_fields=keep_fields, allow_missing_ids=allow_missing_ids)
        self._flush_rows = flush_rows
        self._processes = processes_per_accelerator
        self._dead_letters = False

    def with_exception_handling(self) -> BulkInference:
        """Return (predictions, dead_letters) instead of failing on a bad row."""
        self._dead_letters = True
        return self

    def expand(self, pcoll):
        infer = beam.ParDo(_InferDoFn(self._model, flush_rows=self._flush_rows,
                                      processes_per_accelerator=self._processes, **self._fields))
        infer = infer.with_outputs(FAILED, main="predictions")
        if self._hints:
            infer = infer.with_resource_hints(**self._hints)
        result = pcoll | "Rebatch" >> beam.ParDo(Rebatch()) | "Infer" >> infer
        if self._dead_letters:
            return result.predictions, result[FAILED]
        _ = result[FAILED] | "FailOnDeadLetter" >> beam.Map(_fail)
        return result.predictions


def _fail(letter: dict):
    raise ValueError(
        f"{letter['error']} (stage {letter['stage']}); use BulkInference(...).with_exception_handling() "
        "to send bad rows to a dead-letter output instead of failing the job"
    )


class _InferDoFn(beam.DoFn):
    """Gathers rows until `flush_rows` are pending, runs the model once over all of them, and emits the
    predicted batches and, on FAILED, a dead letter per row that was bad or that the model failed on."""

    def __init__(self, model, *, input_field, id_field, output_field, keep_fields, flush_rows, allow_missing_ids,
                 processes_per_accelerator=None):
        self._model = model
        self._processes = processes_per_accelerator
        self._check_ids = id_field is not None and not allow_missing_ids
        self._input_field, self._id_field = input_field, id_field
        self._output_field, self._keep = output_field, keep_fields
        self._flush_rows = flush_rows
        self._warned: set[str] = set()  # kept fields already named as absent
        self._rows_in = Metrics.counter(NAMESPACE, "infer_rows_in")
        self._rows_out = Metrics.counter(NAMESPACE, "infer_rows_out")
        self._failed = Metrics.counter(NAMESPACE, "infer_rows_failed")

    def setup(self):
        share_accelerator_memory(self._processes)  # before this process's first jax computation
        self._loaded = load_shared(self._model)
        self._in_fields = field_names(self._loaded.inputs, self._input_field, "input_field")
        self._out_fields = field_names(self._loaded.outputs, self._output_field, "output_field")
        clash = sorted(set(self._keep or ()) & set(self._out_fields.values()))
        if clash:
            raise BadSettings(f"keep_fields {clash} would be overwritten by the model's outputs of the same names; "
                              "rename those input fields first, or keep other fields")

    def start_bundle(self):
        report_load(self._model)
        # (batch, valid row indices or None for all rows, {input: their values}, how many)
        self._pending: list[tuple[Batch, list[int] | None, dict, int]] = []
        self._pending_rows = 0

    def process(self, batch: Batch):
        self._rows_in.inc(len(batch))
        valid, inputs, bad = model_inputs(batch, self._loaded.inputs, self._in_fields,
                                          id_field=self._id_field if self._check_ids else None)
        for i, error in bad:
            yield self._letter(batch, i, error)
        n = len(batch) if valid is None else len(valid)
        self._pending.append((batch, valid, inputs, n))
        self._pending_rows += n
        if self._pending_rows >= self._flush_rows:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, in_global_window(out.value))
            else:
                yield in_global_window(out)

    def _letter(self, batch: Batch, i: int, error: str, stage: str = "inference"):
        self._failed.inc()
        row = batch.row(i)
        row_id = row.get(self._id_field) if isinstance(row, dict) and self._id_field else None
        where = batch.where(i) + (f" (id {row_id!r})" if row_id is not None else "")
        pos = batch.positions[i] if batch.positions is not None else None
        letter = dead_letter(stage=stage, error=f"{where}: {error}", record=row, row_id=row_id, source=batch.source,
                             position=pos, unit=batch.unit)
        return beam.pvalue.TaggedOutput(FAILED, letter)

    def _warn_absent(self, batch: Batch) -> None:
        """Logs, once per field and worker, a kept field that no row of a batch has (its column is all null)."""
        for name in absent_fields(batch, [f for f in self._keep or () if f not in self._warned]):
            self._warned.add(name)
            log.warning("keep_fields: %r is in no row of %s, so its output column is null; a misspelt field name?",
                        name, batch.source or "a batch")

    def _flush(self):
        pending, self._pending, self._pending_rows = self._pending, [], 0
        n = sum(k for *_, k in pending)
        if not n:  # every pending row was a dead letter
            progress.advance(sum(len(b) for b, *_ in pending))
            return
        inputs = {spec.name: _concat([p[2][spec.name] for p in pending if p[3]]) for spec in self._loaded.inputs}
        stats = EngineStats(on_rows=progress.computed)  # the live line moves during a long flush
        preds, errors = predict_isolating(self._loaded, inputs, n, stats)
        report_engine_stats(stats)
        progress.advance(0, tokens=stats.real_tokens)
        offset = 0
        for batch, valid, _, k in pending:
            self._warn_absent(batch)
            out, failed = attach(batch, valid, preds, errors, offset, self._out_fields, self._keep)
            for i, error in failed:
                yield self._letter(batch, i, error)
            offset += k
            self._rows_out.inc(len(out))
            progress.advance(len(batch))
            if batch.from_rows:
                yield from out.rows
            elif len(out):
                yield out


def field_names(specs, field: str | None, option: str) -> dict[str, str]:
    """Tensor name -> row field: the tensor's own name, or `field` for a model with exactly one tensor."""
    if field is None:
        return {s.name: s.name for s in specs}
    if len(specs) != 1:
        raise ValueError(f"{option}={field!r} needs a model with one tensor there; this one has "
                         f"{[s.name for s in specs]}, which use the row fields of the same names")
    return {specs[0].name: field}


def _concat(parts: list):
    """One input's values from several batches: arrays concatenated, lists joined."""
    if parts and isinstance(parts[0], np.ndarray):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return list(itertools.chain.from_iterable(parts))
