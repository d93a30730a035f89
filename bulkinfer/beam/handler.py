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

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from bulkinfer.beam.loading import report_engine_stats
from bulkinfer.runtime import EngineStats


class JaxModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """A ModelHandler for any bulkinfer model spec: `load()` gives an object with `predict(values, stats=)`.

    model: e.g. `TextEmbedder.from_name("minilm")`; picklable, loaded on the worker.
    batch_size: rows per RunInference batch (BatchElements min and max): large, so the engine can
      sort and bucket them with little padding.
    """

    def __init__(self, model, *, batch_size: int = 1024):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not hasattr(model, "load"):
            raise TypeError(f"model {model!r} has no load(); pass a spec such as TextEmbedder.from_name('minilm')")
        super().__init__()
        self._model = model
        self._batch_size = batch_size

    def load_model(self):
        return self._model.load()

    def run_inference(self, batch: Sequence[Any], model, inference_args: dict[str, Any] | None = None,
                      ) -> Iterable[PredictionResult]:
        if inference_args:
            raise ValueError(f"JaxModelHandler takes no inference_args, got {sorted(inference_args)}")
        stats = EngineStats()
        predictions = model.predict(list(batch), stats=stats)
        report_engine_stats(stats)
        model_id = getattr(model, "name", None)
        return [PredictionResult(x, p, model_id) for x, p in zip(batch, predictions)]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(len(x) if isinstance(x, str | bytes) else 8 for x in batch)

    def get_metrics_namespace(self) -> str:
        return "bulkinfer_RunInference"
