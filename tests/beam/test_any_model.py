"""Any JAX model through BulkInference: dict rows and Parquet, dict outputs, wrong shapes dead-lettered."""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

import bulkinfer
from bulkinfer.testing import TINY_CLASSIFIER_INPUTS as INPUTS
from bulkinfer.testing import tiny_classifier, tiny_classifier_params

PARAMS = tiny_classifier_params(0)
PIXELS = np.random.default_rng(2).standard_normal((40, 4, 3)).astype(np.float32)
MODEL = bulkinfer.JaxModel(tiny_classifier, params=PARAMS, inputs=INPUTS, name="tiny", batch_size=16)


def _check_predictions(expected_ids):
    want = {"score": np.asarray(tiny_classifier(PARAMS, {"pixels": PIXELS})["score"])}
    want["label"] = want["score"].argmax(-1)

    def check(rows):
        assert sorted(r["id"] for r in rows) == sorted(expected_ids)
        for r in rows:
            np.testing.assert_allclose(r["score"], want["score"][r["id"]], atol=1e-5)
            assert int(r["label"]) == int(want["label"][r["id"]])
    return check


def test_dict_rows_in_every_form_and_wrong_shapes_as_dead_letters():
    forms = [lambda x: x.tolist(), lambda x: x, lambda x: x.reshape(-1).tolist()]
    rows = [{"id": i, "pixels": forms[i % 3](PIXELS[i])} for i in range(40)]
    rows[5]["pixels"] = [1.0, 2.0]
    rows[7]["pixels"] = "not numbers"
    del rows[9]["pixels"]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        good, failed = (p | beam.Create(rows) | bulkinfer.BulkInference(MODEL).with_exception_handling())
        assert_that(good, _check_predictions([i for i in range(40) if i not in (5, 7, 9)]), label="good")
        assert_that(failed | beam.Map(lambda f: (f["id"], f["error"].split(": ", 1)[1])), equal_to([
            (5, "field 'pixels' has shape [2], expected [4, 3] (or 12 numbers, row-major)"),
            (7, "field 'pixels' is str, expected float32[4, 3]"),
            (9, "field 'pixels' is missing")]), label="failed")


def test_parquet_fixed_size_lists_stay_columnar_and_match(tmp_path):
    flat = pa.FixedSizeListArray.from_arrays(pa.array(PIXELS.reshape(-1)), 12)
    nested = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(PIXELS.reshape(-1)), 3), 4)
    pq.write_table(pa.table({"id": np.arange(20), "pixels": flat.slice(0, 20)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": np.arange(20, 40), "pixels": nested.slice(20, 20)}), tmp_path / "b.parquet")

    def table_rows(batch):
        assert batch.table is not None  # the table went through inference as a table
        assert batch.table.schema.field("score").type == pa.list_(pa.float32(), 2)
        return batch.rows

    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = (p | bulkinfer.io.ReadDataset(str(tmp_path / "*.parquet"))
               | bulkinfer.BulkInference(MODEL, keep_fields=[]) | beam.FlatMap(table_rows))
        assert_that(out, _check_predictions(list(range(40))))
