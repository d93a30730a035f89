"""tasks.fields: a vector field as [N, width] with the model contract's per-row checks, from Arrow columns
and dict rows alike."""

import numpy as np
import pyarrow as pa

from bulkinfer.beam.batch import Batch
from bulkinfer.tasks.fields import column, vectors


def test_a_fixed_size_list_column_is_read_whole_and_a_null_row_is_named():
    probs = pa.array([[0.25, 0.75], None, [1.0, 0.0]], pa.list_(pa.float32(), 2))
    batch = Batch(pa.table({"id": [1, 2, 3], "probs": probs}))
    errors = {}
    out = vectors(batch, "probs", 2, "float32", errors, missing="; set --probs-field")
    assert out.dtype == np.float32 and out.shape == (3, 2) and out.flags.writeable
    np.testing.assert_array_equal(out, [[0.25, 0.75], [0, 0], [1, 0]])
    assert errors == {1: "field 'probs' is missing or null; set --probs-field"}
    out[0] = 9  # the caller may write into it: not a view of Arrow's buffer
    assert batch.table.column("probs")[0].as_py() == [0.25, 0.75]


def test_dict_rows_are_checked_one_by_one_with_the_field_named():
    rows = [{"e": [1, 2, 3]}, {"e": [1.0, 2.0]}, {}, {"e": "high"}, {"e": [[1, 2], [3]]}, {"e": [1e300, 0, 0]},
            {"e": [True, False, True]}, {"e": np.array([0.5, 0.5, 0.5])}]
    errors = {2: "an earlier error"}  # kept: only rows without one get the field's
    out = vectors(Batch(rows), "e", 3, "float32", errors)
    assert out.shape == (8, 3)
    np.testing.assert_array_equal(out[[0, 7]], [[1, 2, 3], [0.5, 0.5, 0.5]])
    assert not out[1:7].any()
    assert errors == {
        1: "field 'e' has shape [2], expected [3]",
        2: "an earlier error",
        3: "field 'e' is str, expected float32[3]",
        4: "field 'e' is a ragged nested list, expected float32[3]",
        5: "field 'e' holds values from 0.0 to 1e+300, outside what float32 holds",
        6: "field 'e' holds bool values, expected float32",
    }
    # float64 holds it: the same value is no error there
    errors = {}
    assert vectors(Batch([{"e": [1e300, 0, 0]}]), "e", 3, "float64", errors)[0, 0] == 1e300 and not errors


def test_a_field_no_row_has():
    errors = {}
    table = Batch(pa.table({"id": ["a", "b"]}))
    assert not vectors(table, "probs", 4, "float64", errors).any() and errors == {
        0: "field 'probs' is missing or null", 1: "field 'probs' is missing or null"}
    assert column(table, "probs") == [None, None] and column(table, "id") == ["a", "b"]
    assert column(Batch([{"id": 1}, {}]), "id") == [1, None]
