"""`JaxModelHandler`: bulkinfer models inside Beam's own `RunInference`, bucketing included.

    from apache_beam.ml.inference.base import RunInference

    handler = bulkinfer.JaxModelHandler(bulkinfer.TextEmbedder.from_name("minilm"))
    with beam.Pipeline() as p:
        (p | beam.Create(["a sentence", "another one"])
           | RunInference(handler)                      # PredictionResult(example, inference=[384] floats)
           | beam.Map(print))

For users who already build on RunInference.  Beam loads the model once per process (RunInference
shares it through `apache_beam.utils.shared.Shared`), batches elements with BatchElements, and calls
`run_inference` on each batch; the model's engine then sorts, buckets and pads the batch into its
compiled shapes, so RunInference's varying batch sizes never cause a compile.  Fixed, large batches
(`batch_size`) keep padding low.  `BulkInference` remains the faster path: it moves batches, not
rows, between stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from bulkinfer.beam.isolate import predict_isolating
from bulkinfer.beam.loading import report_engine_stats
from bulkinfer.models.resolve import model_spec
from bulkinfer.runtime import EngineStats
from bulkinfer.runtime.process import share_accelerator_memory


class ModelFailed(RuntimeError):
    """The model failed on this element alone (found by bisecting its batch)."""


class JaxModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """A ModelHandler for any bulkinfer model: a built-in name, a model directory or a spec.

    An element is the value of the model's one input (a string for a text model, an array for
    `JaxModel(inputs={"pixels": ...})`), or a dict {input name: value} for a model with several inputs.
    `PredictionResult.inference` is the output array for that element, or a dict of them for a model
    with several outputs.

    Bad elements fail alone, not with their batch: each element is checked against the model's inputs in
    a preprocessing step (where the spec declares `input_signature`), and a batch the model fails on is bisected
    until the failing elements are isolated; those fail in a postprocessing step.  Inside
    `RunInference(handler).with_exception_handling()` each reaches the failed output
    (`failed_preprocessing` / `failed_postprocessing`) on its own; without it, the first fails the job.

    model: e.g. "minilm" or `TextEmbedder.from_name("minilm")`; picklable, loaded on the worker.
    batch_size: rows per RunInference batch (BatchElements min and max): large, so the engine can
      sort and bucket them with little padding.
    processes_per_accelerator: SDK processes sharing each GPU on a worker (as for `BulkInference`; default:
      the worker's $BULKINFER_PROCESSES_PER_ACCELERATOR, else 1).
    Raises ValueError/TypeError here, at pipeline construction, for a model that is none of the above.
    """

    def __init__(self, model, *, batch_size: int = 1024, processes_per_accelerator: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if processes_per_accelerator is not None and processes_per_accelerator < 1:
            raise ValueError(f"processes_per_accelerator must be >= 1, got {processes_per_accelerator}")
        super().__init__()
        self._model = model_spec(model)
        self._batch_size = batch_size
        self._processes = processes_per_accelerator
        self._inputs = getattr(self._model, "input_signature", None)  # known before loading for local specs

    def load_model(self):
        share_accelerator_memory(self._processes)  # before this process's first jax computation
        return self._model.load()

    def get_preprocess_fns(self) -> Iterable[Callable[[Any], Any]]:
        return [self._check] if self._inputs else []

    def get_postprocess_fns(self) -> Iterable[Callable[[Any], Any]]:
        return [_raise_failed]

    def _check(self, element):
        """The element in the model's form; raises ValueError naming the input, expected and actual."""
        if len(self._inputs) == 1:
            value, error = self._inputs[0].check(element)
            if error is not None:
                raise ValueError(f"element {_short(element)}: {error}")
            return value
        if not isinstance(element, dict):
            raise ValueError(f"element {_short(element)}: expected a dict of {[s.name for s in self._inputs]}")
        checked = {}
        for spec in self._inputs:
            if spec.name not in element:
                raise ValueError(f"element {_short(element)}: field {spec.name!r} is missing")
            checked[spec.name], error = spec.check(element[spec.name])
            if error is not None:
                raise ValueError(f"element {_short(element)}: {error}")
        return checked

    def run_inference(self, batch: Sequence[Any], model, inference_args: dict[str, Any] | None = None,
                      ) -> Iterable[PredictionResult]:
        if inference_args:
            raise ValueError(f"JaxModelHandler takes no inference_args, got {sorted(inference_args)}")
        specs = model.inputs
        if len(specs) == 1:
            inputs = {specs[0].name: specs[0].stack(list(batch))}
        else:
            inputs = {s.name: s.stack([element[s.name] for element in batch]) for s in specs}
        stats = EngineStats()
        preds, errors = predict_isolating(model, inputs, len(batch), stats)
        report_engine_stats(stats)
        model_id = getattr(model, "name", None)
        results = []
        for i, x in enumerate(batch):
            if i in errors:
                results.append(PredictionResult(x, ModelFailed(errors[i]), model_id))
            elif len(preds) == 1:
                results.append(PredictionResult(x, next(iter(preds.values()))[i], model_id))
            else:
                results.append(PredictionResult(x, {name: p[i] for name, p in preds.items()}, model_id))
        return results

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(len(x) if isinstance(x, str | bytes) else getattr(x, "nbytes", 8) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "bulkinfer_RunInference"


def _raise_failed(result: PredictionResult) -> PredictionResult:
    if isinstance(result.inference, ModelFailed):
        raise ModelFailed(f"element {_short(result.example)}: model failed: {result.inference}")
    return result


def _short(element) -> str:
    text = repr(element.tolist() if isinstance(element, np.ndarray) else element)
    return text if len(text) <= 80 else text[:77] + "..."
