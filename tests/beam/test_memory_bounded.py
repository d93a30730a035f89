"""A job's memory does not grow with its size: writers hold a bounded number of bytes, not rows, and
nothing keeps a flush's outputs alive after it (bench/memory.py measures the whole job)."""

import gc
import json
import weakref

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from bulkinfer.beam import commit, io, writers
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


def test_parquet_files_are_written_in_small_row_groups_without_float_dictionaries(tmp_path, monkeypatch):
    """Arrow's writer holds a row group's pages, levels and dictionaries while it writes it: a whole file in
    one group took ~4x the file's bytes.  Row groups of about ROW_GROUP_BYTES, and no dictionary for floats."""
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 64 << 10)
    n = 1000
    table = pa.table({"id": pa.array(range(n)), "label": pa.array([f"class-{i % 3}" for i in range(n)]),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 64, dtype=np.float32)), 64)})
    final = str(tmp_path / "part-0.parquet")
    writers.commit(writers.write_temp(final, table, "parquet"), final)
    meta = pq.ParquetFile(final).metadata
    per_group = writers.row_group_rows(table)
    assert per_group == (64 << 10) * n // table.nbytes and meta.num_row_groups == -(-n // per_group) > 1
    columns = {meta.row_group(0).column(c).path_in_schema.split(".")[0]: meta.row_group(0).column(c)
               for c in range(meta.num_columns)}
    assert not columns["embedding"].has_dictionary_page and columns["label"].has_dictionary_page
    assert pq.read_table(final).equals(table)


def test_workers_use_the_system_memory_pool_unless_the_user_chose_one(monkeypatch):
    before = pa.default_memory_pool()
    try:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        writers.use_system_memory_pool()
        assert pa.default_memory_pool().backend_name == "mimalloc"  # the user's choice stands
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
        writers.use_system_memory_pool()
        assert pa.default_memory_pool().backend_name == "system"
        writers.release_memory()  # returns freed memory to the OS; callable any time
    finally:
        pa.set_memory_pool(before)


def test_a_shard_writer_holds_a_row_group_not_a_file(tmp_path, monkeypatch):
    """Rows go to the open file every ROW_GROUP_BYTES; a column of nulls takes the file's type, a column whose
    type changed starts the next file; nothing is lost or reordered."""
    monkeypatch.setattr(writers, "ROW_GROUP_BYTES", 4096)
    names = iter(str(tmp_path / f"part-{k}.parquet") for k in range(10))
    writer = writers.ShardWriter(lambda: next(names), "parquet", None)
    vectors = lambda k: pa.FixedSizeListArray.from_arrays(pa.array(np.full(100 * 8, k, np.float32)), 8)  # noqa: E731
    done = []
    for k in range(6):  # 100 rows of ~40 bytes each: a row group every batch or so
        label = pa.nulls(100, pa.string()) if k == 0 else pa.array([f"l{k}"] * 100) if k != 2 else pa.nulls(100)
        ids = pa.array(range(100 * k, 100 * k + 100)) if k < 4 else pa.array([str(i) for i in range(100 * k, 100 * k + 100)])
        done += writer.add(Batch(pa.table({"id": ids, "label": label, "v": vectors(k)})))
        assert writer.buffered_bytes < 4096 + 100 * 48  # at most a row group and one batch
    done += writer.close()
    assert [final for _, final, _ in done] == [str(tmp_path / "part-0.parquet"), str(tmp_path / "part-1.parquet")]
    assert [rows for *_, rows in done] == [400, 200]  # ids turn to text at row 400: a file of their own
    for temp, final, _ in done:
        writers.commit(temp, final)
    first, second = (pq.read_table(final) for _, final, _ in done)
    assert pq.ParquetFile(done[0][1]).metadata.num_row_groups >= 4
    assert first.column("id").to_pylist() == list(range(400)) and second.column("id").to_pylist() == [
        str(i) for i in range(400, 600)]
    assert first.column("label").to_pylist() == [None] * 100 + ["l1"] * 100 + [None] * 100 + ["l3"] * 100
    assert second.column("v").to_pylist()[0] == [4.0] * 8
