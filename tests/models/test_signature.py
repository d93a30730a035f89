"""The model contract's tensors: row values checked and stacked, Arrow columns converted without Python rows."""

import numpy as np
import pyarrow as pa
import pytest

from bulkinfer.models.signature import TEXT, TensorSpec, signature

PIXELS = TensorSpec("pixels", (8, 8), "float32")


def test_numbers_come_as_nested_lists_arrays_or_flat_row_major():
    image = np.arange(64, dtype=np.int64).reshape(8, 8)
    for value in (image.tolist(), image, image.reshape(-1).tolist()):
        checked, error = PIXELS.check(value)
        assert error is None
        assert checked.dtype == np.float32 and checked.shape == (8, 8)
        np.testing.assert_array_equal(checked, image)


@pytest.mark.parametrize("value, error", [
    ([1, 2, 3], "field 'pixels' has shape [3], expected [8, 8] (or 64 numbers, row-major)"),
    (np.zeros((8, 7)), "field 'pixels' has shape [8, 7], expected [8, 8]"),
    (None, "field 'pixels' is null, expected float32[8, 8]"),
    ("abc", "field 'pixels' is str, expected float32[8, 8]"),
    ([[1, 2], [3]], "field 'pixels' is a ragged nested list, expected float32[8, 8]"),
    ([["a"] * 8] * 8, "field 'pixels' holds text, expected float32[8, 8]"),
])
def test_a_wrong_value_names_the_field_the_expected_and_the_actual(value, error):
    checked, got = PIXELS.check(value)
    assert checked is None
    assert got.startswith(error)


def test_floats_are_not_taken_where_integers_are_expected():
    ids = TensorSpec("ids", (None,), "int32")
    assert ids.check([1, 2, 3])[0].dtype == np.int32
    assert ids.check([1.5, 2.0])[1] == "field 'ids' holds float64 values, expected int32"
    assert ids.check([True, False])[1] == "field 'ids' holds bool values, expected int32"  # JSON true is no id
    assert ids.check([])[1] == "field 'ids' is empty, expected int32[?]"


def test_text_and_variable_axes_stay_lists_fixed_shapes_stack():
    text = TensorSpec("text", (), TEXT)
    assert text.check("hi") == ("hi", None)
    assert text.check(5)[1] == "field 'text' is int, expected a string"
    assert text.stack(["a", "b"]) == ["a", "b"]
    rows = [PIXELS.check(np.full(64, i))[0] for i in range(3)]
    stacked = PIXELS.stack(rows)
    assert stacked.shape == (3, 8, 8) and stacked[2, 0, 0] == 2
    assert PIXELS.stack([]).shape == (0, 8, 8)


def test_arrow_fixed_size_lists_and_tensors_convert_as_one_array():
    images = np.arange(3 * 64, dtype=np.float64).reshape(3, 64)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 64)
    nested = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 8), 8)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float64(), (8, 8)), flat)
    for column in (flat, nested, tensor, pa.chunked_array([flat.slice(0, 1), flat.slice(1)])):
        values, errors = PIXELS.column(column)
        assert errors == {}
        np.testing.assert_array_equal(values, images.reshape(3, 8, 8).astype(np.float32))
    with_null = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 64,
                                                  mask=pa.array([False, True, False]))
    values, errors = PIXELS.column(with_null)
    assert errors == {1: "field 'pixels' is null, expected float32[8, 8]"}
    np.testing.assert_array_equal(values[2], images[2].reshape(8, 8))


def test_arrow_layouts_without_a_dense_form_are_left_to_row_checks():
    assert PIXELS.column(pa.array([[1.0] * 64, [2.0] * 3])) is None  # variable-size lists
    wrong_size = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6)), 3)
    assert PIXELS.column(wrong_size) is None


def test_signature_from_the_short_form_and_its_errors():
    specs = signature({"pixels": ((8, 8), "float32"), "text": ((), TEXT)})
    assert specs == (PIXELS, TensorSpec("text", (), TEXT))
    assert PIXELS.v2_datatype == "FP32" and PIXELS.v2_shape() == [-1, 8, 8]
    with pytest.raises(ValueError, match="expected \\(shape, dtype\\)"):
        signature({"pixels": (8, 8, 1)})
    with pytest.raises(ValueError, match="at most one None"):
        TensorSpec("x", (None, None))
    with pytest.raises(ValueError, match="dtype 'complex64' is not supported"):
        TensorSpec("x", (2,), "complex64")


def test_values_a_narrower_dtype_cannot_hold_are_refused_not_wrapped():
    ids = TensorSpec("ids", (2,), "int32")
    assert ids.check([1, 2**31 - 1])[1] is None
    assert ids.check([1, 2**40])[1] == "field 'ids' holds values from 1 to 1099511627776, outside what int32 holds"
    half = TensorSpec("x", (2,), "float16")
    assert half.check([1.5, 1e6])[1] == "field 'x' holds values from 1.5 to 1000000.0, outside what float16 holds"
    assert half.check([1.5, float("inf")])[1] is None  # already infinite: nothing lost
    big = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 2**40], pa.int64()), 2)
    assert ids.column(big) is None  # row by row, so that only the bad row fails
    values, errors = ids.column(pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4], pa.int64()), 2))
    assert errors == {} and values.dtype == np.int32 and values.tolist() == [[1, 2], [3, 4]]
