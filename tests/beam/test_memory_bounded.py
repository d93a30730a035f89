"""A job's memory does not grow with its size: writers hold a bounded number of bytes, not rows, and
nothing keeps a flush's outputs alive after it (bench/memory.py measures the whole job)."""

import gc
import json
import weakref

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from bulkinfer.beam import commit, io
from bulkinfer.beam.batch import Batch
from bulkinfer.beam.isolate import predict_isolating
from bulkinfer.runtime import EngineStats
from bulkinfer.tasks import run as job
from bulkinfer.testing import CountingModel


def test_one_units_predictions_go_to_several_files_past_the_byte_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(commit, "BYTES_PER_FILE", 64 << 10)
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": "x" * (i % 50)}) + "\n" for i in range(3000))
    out = tmp_path / "out"
    report = job.run(CountingModel(), job.JobSpec(input=str(tmp_path / "in.jsonl"), output=str(out)))
    assert report["units"] == 1 and report["reconciled"] and report["rows_out"] == 3000
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) > 1  # 100,000 rows per file would have made one
    ids = [i for p in parts for i in pq.read_table(p).column("id").to_pylist()]
    assert sorted(ids) == list(range(3000))


def test_write_dataset_splits_files_by_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "BYTES_PER_FILE", 100_000)
    rows = [{"id": i, "embedding": np.full(64, i, np.float32)} for i in range(1000)]  # ~256 B of floats each
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (p | beam.Create([Batch(rows[k:k + 100]) for k in range(0, 1000, 100)]).with_output_types(Batch)
             | io.WriteDataset(str(tmp_path / "out")))
    files = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(files) > 1
    tables = [pq.read_table(f) for f in files]
    assert sum(t.num_rows for t in tables) == 1000
    assert all(t.num_rows <= 300 for t in tables)  # ~100 kB of rows (+ one batch of 100) per file


def test_predictions_are_freed_by_reference_counting_alone():
    """A reference cycle would keep each flush's [n, ...] outputs until the cyclic collector ran."""
    loaded = CountingModel(fail_on="boom").load()
    texts = ["a", "bb", "boom", "ccc", "dddd", "boom!", "e"]
    gc.disable()
    try:
        out, errors = predict_isolating(loaded, {"text": texts}, len(texts), EngineStats())
        assert out["length"].tolist() == [1, 2, 0, 3, 4, 0, 1] and sorted(errors) == [2, 5]
        freed = weakref.ref(out["length"])
        del out
        assert freed() is None
    finally:
        gc.enable()
