import json
import pickle

import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import Batch


def _vectors(n, d=2):
    return pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * d, dtype=np.float32)), d)


def test_table_batch_gives_dict_rows_lazily_with_vectors_as_numpy():
    table = pa.table({"id": [1, 2, 3], "text": ["a", None, "c"], "v": _vectors(3)})
    batch = Batch(table, source="data/a.parquet", positions=range(1, 4))
    assert batch.table is table and batch._rows is None and len(batch) == 3
    assert batch.row(1)["text"] is None and batch._rows is None  # one row, the others not made
    rows = batch.rows
    assert [r["id"] for r in rows] == [1, 2, 3] and batch.rows is rows  # made once, cached
    np.testing.assert_array_equal(rows[2]["v"], [4.0, 5.0])
    assert batch.where(2) == "data/a.parquet row 3"
    assert Batch(table.to_batches()[0]).table.equals(table)  # a RecordBatch is kept as a table


def test_take_keeps_positions_for_tables_and_dict_rows():
    table = pa.table({"id": [10, 11, 12, 13]})
    for batch in (Batch(table, source="a.parquet", positions=range(5, 9)),
                  Batch(table.to_pylist(), source="a.parquet", positions=[5, 6, 7, 8])):
        part = batch.take([1, 3])
        assert [r["id"] for r in part.rows] == [11, 13] and list(part.positions) == [6, 8]
        assert (part.table is None) == (batch.table is None)
        assert batch.take(range(4)).positions is batch.positions
        assert len(batch.take([])) == 0
    whole = Batch(table)
    assert whole.take([0, 1, 2, 3]).table is table  # every row, in order: nothing copied
    assert whole.take([1, 0]).positions == [2, 1]
    replaced = whole.take([0, 2], pa.table({"id": [0, 2], "x": ["p", "q"]}))
    assert replaced.rows == [{"id": 0, "x": "p"}, {"id": 2, "x": "q"}]


def test_equality_and_pickling_of_table_batches():
    table = pa.table({"id": [1, 2], "text": ["a", "b"]})
    batch = Batch(table, source="a.parquet", positions=range(1, 3))
    _ = batch.rows
    copy = pickle.loads(pickle.dumps(batch))
    assert copy._rows is None  # the cached dict rows do not travel
    assert copy == batch == Batch(table, source="a.parquet", positions=[1, 2])
    assert batch != Batch(table, source="b.parquet", positions=[1, 2])
    assert Batch(table.to_pylist(), source="a.parquet", positions=[1, 2]) == batch


def test_to_json_keeps_one_record_per_line_for_any_reader():
    from bulkinfer.beam.batch import to_json

    row = {"text": "a\u0085b\u2028c\u2029d é 東京"}
    line = to_json(row)
    assert len(line.splitlines()) == 1 and "é 東京" in line
    assert json.loads(line) == row


def test_to_json_escapes_lone_surrogates_so_the_line_encodes_and_reads_back_the_same():
    from bulkinfer.beam.batch import to_json

    row = {"id": "s\udc80", "text": "ok\ud800bad", "nested": [{"k\udfff": "é"}]}  # as json.loads gives them
    line = to_json(row)
    assert "ok\\ud800bad" in line and "s\\udc80" in line and '"k\\udfff"' in line and "é" in line
    line.encode("utf-8")  # no UnicodeEncodeError
    assert json.loads(line) == row
