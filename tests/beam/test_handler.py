"""bulkinfer.JaxModelHandler inside Beam's own RunInference, on the FnApiRunner."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that

import bulkinfer
from bulkinfer.runtime import Bucketing

TEXTS = ["A short one.", "Beam runs the pipeline on workers.", "x", "Embeddings of sentences, in bulk.",
         "The quick brown fox jumps over the lazy dog near the river bank today."]


@pytest.fixture(scope="module")
def model():
    return bulkinfer.TextEmbedder.from_name(
        "minilm", max_length=32, bucketing=Bucketing(lengths=(16,), token_budget=64, ladder=1))


def test_run_inference_matches_predict(model):
    expected = dict(zip(TEXTS, model.load().predict(TEXTS)))

    def check(results):
        assert sorted(r.example for r in results) == sorted(TEXTS)
        for r in results:
            assert r.model_id == "minilm"
            np.testing.assert_allclose(r.inference, expected[r.example], atol=1e-5)

    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create(TEXTS) | RunInference(bulkinfer.JaxModelHandler(model, batch_size=4))
        assert_that(out, check)


def test_fixed_large_batches_and_errors_name_the_fix(model):
    assert bulkinfer.JaxModelHandler(model, batch_size=512).batch_elements_kwargs() == {
        "min_batch_size": 512, "max_batch_size": 512}
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        bulkinfer.JaxModelHandler(model, batch_size=0)
    with pytest.raises(TypeError, match="has no load"):
        bulkinfer.JaxModelHandler("minilm")
