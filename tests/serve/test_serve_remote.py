"""`RemoteModel` and `BulkInference(server=...)`: same rows as local mode; a server that is down costs one
retry budget per call, not one per row."""

from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that

from bulkinfer import BulkInference, TextEmbedder
from bulkinfer.beam.loading import load_shared
from bulkinfer.errors import ModelUnavailable
from bulkinfer.serve import RemoteModel, RetryPolicy, ServeConfig, start
from bulkinfer.testing import synthetic_texts


def test_predict_matches_local_across_concurrent_chunks(server, embedder):
    texts = [f"row {i}: " + "beam worker " * (i % 6) for i in range(45)]  # short: few shapes to compile
    loaded = RemoteModel(url=server.url, name="minilm", chunk_rows=7, max_in_flight=3).load()
    assert loaded.name == "minilm"
    assert loaded.inputs == embedder.inputs and loaded.outputs == embedder.outputs  # text [] -> float32 [384]
    got = loaded.embed(texts)
    assert got.shape == (45, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-6)  # order kept across 7 chunks


def test_bulk_inference_with_server_equals_local_rows(server, embedder):
    texts = synthetic_texts(30, seed=5)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)] + [{"id": 99, "text": None}]
    expect = embedder.embed(texts)

    def same_as_local(predictions):
        assert sorted(r["id"] for r in predictions) == list(range(30))
        for r in predictions:
            np.testing.assert_allclose(r["embedding"], expect[r["id"]], atol=1e-6)

    def only_the_null_row(failed):
        assert [f["id"] for f in failed] == [99] and "field 'text' is null" in failed[0]["error"]

    spec = TextEmbedder.from_name("minilm")
    with test_pipeline.TestPipeline() as p:
        preds, failed = (p | beam.Create(rows)
                         | BulkInference(spec, server=server.url).with_exception_handling())
        assert_that(preds, same_as_local, label="predictions")
        assert_that(failed, only_the_null_row, label="failed")


def test_server_down_fails_the_bundle_without_bisecting_or_dead_letters(embedder):
    srv = start(embedder, ServeConfig(port=0))
    spec = RemoteModel(url=srv.url, name="minilm", chunk_rows=8, retry=RetryPolicy(budget_s=0.4, base_s=0.05))
    loaded = load_shared(spec)  # the job's worker connected while the server was up ...
    srv.stop()  # ... and then the server went away
    calls = []  # rows of each predict call that the transform makes
    predict = loaded.predict
    loaded.predict = lambda inputs, stats=None: calls.append(len(inputs["text"])) or predict(inputs, stats)
    rows = [{"id": i, "text": f"text {i}"} for i in range(64)]
    try:
        with pytest.raises(ModelUnavailable) as failure:  # an outage is not the rows' fault
            with test_pipeline.TestPipeline() as p:
                preds, failed = p | beam.Create(rows) | BulkInference(spec).with_exception_handling()
                assert_that(failed, lambda got: pytest.fail(f"{len(got)} dead letters"), label="failed")
    finally:
        del loaded.predict
    assert srv.url in str(failure.value) and "ConnectionRefusedError" in str(failure.value)
    # One call for all 64 rows, one retry budget; bisecting down to single rows would make 127 calls.
    assert calls == [64]


def test_wrong_token_fails_at_load_with_the_reason(embedder):
    srv = start(embedder, ServeConfig(port=0, token="right"))
    try:
        with pytest.raises(ModelUnavailable, match="401"):
            RemoteModel(url=srv.url, name="minilm", token="wrong").load()
        got = RemoteModel(url=srv.url, name="minilm", token="right").load().embed(["x"])
        np.testing.assert_allclose(got, embedder.embed(["x"]), atol=1e-6)
    finally:
        srv.stop()


def test_unknown_model_name_fails_at_load(server):
    with pytest.raises(ModelUnavailable, match="not served here"):
        RemoteModel(url=server.url, name="bert-large").load()


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_retry(embedder, caplog):
    srv = start(embedder, ServeConfig(port=0, idle_timeout_s=0.3))
    try:
        loaded = RemoteModel(url=srv.url, name="minilm").load()
        np.testing.assert_allclose(loaded.embed(["first"]), embedder.embed(["first"]), atol=1e-6)
        deadline = time.monotonic() + 30
        while srv.connections:  # the server drops the kept-alive connection after 0.3 s idle
            assert time.monotonic() < deadline, "the idle connection was not closed within 30 s"
            time.sleep(0.01)
        with caplog.at_level("WARNING", logger="bulkinfer.serve.remote_model"):
            np.testing.assert_allclose(loaded.embed(["second"]), embedder.embed(["second"]), atol=1e-6)
        assert not [r for r in caplog.records if "retry" in r.getMessage()]
    finally:
        srv.stop()
