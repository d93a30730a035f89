"""bulkinfer.JaxModelHandler inside Beam's own RunInference, on the FnApiRunner."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

import bulkinfer
from bulkinfer.runtime import Bucketing

TEXTS = ["A short one.", "Beam runs the pipeline on workers.", "x", "Embeddings of sentences, in bulk.",
         "The quick brown fox jumps over the lazy dog near the river bank today."]


@pytest.fixture(scope="module")
def model():
    return bulkinfer.TextEmbedder.from_name(
        "minilm", max_length=32, bucketing=Bucketing(lengths=(16,), token_budget=64, ladder=1))


def test_run_inference_matches_predict(model):
    expected = dict(zip(TEXTS, model.load().embed(TEXTS)))

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
    assert bulkinfer.JaxModelHandler("minilm")._model == bulkinfer.TextEmbedder.from_name("minilm")
    with pytest.raises(TypeError, match="neither a built-in name .* nor a model spec"):
        bulkinfer.JaxModelHandler(12345)
    with pytest.raises(ValueError, match="'no-such-model' is neither a built-in name"):
        bulkinfer.JaxModelHandler("no-such-model")


def _run_with_failures(handler, elements, check_good, check_pre, check_post):
    """Runs RunInference(handler).with_exception_handling() and checks each output with assert_that:
    predictions as (example, inference), failed_preprocessing and failed_postprocessing as (element, error)."""
    with beam.Pipeline(runner=FnApiRunner()) as p:
        good, failed = p | beam.Create(elements) | RunInference(handler).with_exception_handling()
        assert_that(good | "Good" >> beam.Map(lambda r: (r.example, r.inference)), check_good, label="good")
        pre = failed.failed_preprocessing[0] | "Pre" >> beam.Map(lambda f: (f[0], f[1][1]))
        assert_that(pre, check_pre, label="pre")
        post = failed.failed_postprocessing[0] | "Post" >> beam.Map(lambda f: (f[0].example, f[1][1]))
        assert_that(post, check_post, label="post")
        assert_that(failed.failed_inferences, equal_to([]), label="no whole batch fails")


def test_a_bad_element_fails_alone_not_with_its_batch(model):
    texts = [f"sentence number {i}" for i in range(64)]
    expected = dict(zip(texts, model.load().embed(texts)))

    def check_good(results):
        assert sorted(x for x, _ in results) == sorted(texts)
        for text, emb in results:
            np.testing.assert_allclose(emb, expected[text], atol=1e-5)

    def check_pre(failures):
        assert sorted(repr(x) for x, _ in failures) == ["12345", "None"]
        assert all("expected a string" in error for _, error in failures), failures

    _run_with_failures(bulkinfer.JaxModelHandler(model, batch_size=32), texts + [None, 12345],
                       check_good, check_pre, equal_to([]))


def test_a_model_failure_is_bisected_to_the_element_that_causes_it():
    from bulkinfer.testing import CountingModel

    texts = [f"row {i}" for i in range(40)] + ["row boom"]

    def check_post(failures):
        assert [x for x, _ in failures] == ["row boom"]
        assert "injected failure" in failures[0][1]

    _run_with_failures(bulkinfer.JaxModelHandler(CountingModel(fail_on="boom"), batch_size=41), texts,
                       equal_to([(t, len(t)) for t in texts[:-1]]), equal_to([]), check_post)
