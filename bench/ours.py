"""bulkinfer's rows: (a) the jitted model on pre-tokenized in-memory batches, (b) the Parquet-to-Parquet
job on the embedded runner, and bulkinfer's half of (e), the per-row overhead with a trivial model."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import bulkinfer
from bench.timing import timed
from bulkinfer.beam.loading import load_shared
from bulkinfer.runtime import EngineStats
from bulkinfer.tasks import run as job
from bulkinfer.testing import CountingModel


def model_spec() -> bulkinfer.TextEmbedder:
    """The model of rows (a) and (b): MiniLM, float32, the runtime's default bucketing."""
    return bulkinfer.TextEmbedder.from_name("minilm")


def limit(spec, texts: list[str]) -> dict:
    """(a) engine.run over the whole corpus, pre-tokenized, after every shape has been compiled.

    The model is loaded through `load_shared`, so it is the process's one instance that (b) uses too.
    """
    with timed() as load:
        loaded = load_shared(spec)
    engine = loaded.engine
    with timed() as tok:
        seqs = loaded.tokenize(texts)
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    compiles0, compile_s0 = engine.stats.compiles, engine.stats.compile_s
    with timed() as warm:
        engine.warmup()  # the warm-up pass: every (batch, length) shape the bucketing allows
    stats = EngineStats()
    with timed() as t:
        out = engine.run({"input_ids": seqs}, stats=stats)["output"]
    return {
        "timing": t,
        "rows": len(texts),
        "rows_per_s": len(texts) / t.wall_s,
        "tokens_per_s": int(lengths.sum()) / t.wall_s,
        "padding_efficiency": stats.padding_efficiency,
        "batches": stats.batches,
        "compiles_in_run": stats.compiles,
        "warmup_compiles": engine.stats.compiles - compiles0,
        "warmup_compile_s": engine.stats.compile_s - compile_s0,
        "warmup_wall_s": warm.wall_s,
        "load_s": load.wall_s,
        "tokenize_us_per_row": tok.wall_s / len(texts) * 1e6,
        "lengths": lengths,
        "max_length": loaded.max_length,
        "embeddings": out,
    }


def end_to_end(spec, input_glob: str, output_dir: str) -> dict:
    """(b) `job.run`: ReadDataset -> BulkInference -> WriteDataset, Parquet to Parquet, on an in-process
    FnApiRunner (job.run's default), with the model (a) loaded and compiled."""
    with timed() as t:
        report = job.run(spec, job.JobSpec(input=input_glob, output=output_dir, overwrite=True), [])
    return {"timing": t, "report": report, "rows": report["rows_out"], "rows_per_s": report["rows_out"] / t.wall_s}


def overhead(input_glob: str, output_dir: str, rows: int) -> dict:
    """bulkinfer's half of (e): the trivial CountingModel through ReadDataset -> BulkInference ->
    WriteDataset (Parquet to Parquet, the seed pipeline's shape), in-process FnApiRunner."""
    model = CountingModel()
    with timed() as t:
        with beam.Pipeline(runner=FnApiRunner()) as p:
            _ = (p | bulkinfer.io.ReadDataset(input_glob)
                 | bulkinfer.BulkInference(model)
                 | bulkinfer.io.WriteDataset(output_dir, columns=["id", "length"]))
    return {"timing": t, "rows": rows, "us_per_row": t.wall_s / rows * 1e6}


def read_only(input_glob: str, rows: int) -> dict:
    """A time split for (e): ReadDataset alone (Parquet -> Batches, counted), no model and no write."""
    with timed() as t:
        with beam.Pipeline(runner=FnApiRunner()) as p:
            _ = p | bulkinfer.io.ReadDataset(input_glob) | beam.Map(len)
    return {"timing": t, "rows": rows, "us_per_row": t.wall_s / rows * 1e6}


def kernel_ms(spec, batch: int, length: int, reps: int) -> float:
    """Milliseconds for `batch` rows of exactly `length` tokens through engine.run (no padding), which cuts
    them into its token-budget batches: the model's own speed, host work included."""
    engine = load_shared(spec).engine
    seqs = [np.full(length, 1000 + i, np.int32) for i in range(batch)]
    engine.run({"input_ids": seqs})  # compile if this shape was not warmed up
    with timed() as t:
        for _ in range(reps):
            engine.run({"input_ids": seqs})
    return t.wall_s / reps * 1000


def pipeline_start_s() -> float:
    """Wall seconds of an almost empty pipeline on the in-process FnApiRunner: the fixed cost in (e)."""
    with timed() as t:
        with beam.Pipeline(runner=FnApiRunner()) as p:
            _ = p | beam.Create([0]) | beam.Map(lambda x: x)
    return t.wall_s
