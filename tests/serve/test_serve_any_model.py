"""Remote mode for any model signature: a small in-test model with two numeric inputs (one with a variable
axis) and two outputs (INT64 and FP32), served by `start` and driven by tritonclient, raw HTTP, `RemoteModel`
and `BulkInference(server=...)` on the FnApiRunner, whose rows must equal local mode's."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading

import apache_beam as beam
import numpy as np
import pytest
import tritonclient.http as triton
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that
from tritonclient.utils import InferenceServerException

from bulkinfer import BulkInference
from bulkinfer.models.signature import TensorSpec
from bulkinfer.serve import RemoteError, RemoteModel, RetryPolicy, ServeConfig, start
from bulkinfer.serve.batcher import DynamicBatcher

INPUTS = (TensorSpec("x", (3,), "float32"), TensorSpec("tokens", (None,), "int32"))
OUTPUTS = (TensorSpec("count", (), "int64"), TensorSpec("score", (2,), "float32"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairModel:
    """A model spec for the contract: x float32 [3] and tokens int32 [?] -> count int64 [], score float32 [2].

    A row whose tokens hold a negative id makes the model fail (a model fault, isolated by bisection)."""

    name: str = "pair"
    inputs = INPUTS

    def load(self):
        return LoadedPair()


class LoadedPair:
    name, load_s, inputs, outputs = "pair", 0.0, INPUTS, OUTPUTS

    def __init__(self):
        self.calls: list[int] = []  # rows per predict call

    def predict(self, inputs, stats=None):
        x, tokens = inputs["x"], inputs["tokens"]  # [N, 3] float32; N arrays [L_i] int32
        assert isinstance(x, np.ndarray) and isinstance(tokens, list)  # the contract's forms, not a test input
        if any((t < 0).any() for t in tokens):
            raise ValueError("token ids must be >= 0")
        if any((t == 999).any() for t in tokens):  # stands for a device lost while the batch ran
            import jax

            raise jax.errors.JaxRuntimeError("INTERNAL: device lost")
        self.calls.append(len(x))
        count = np.array([len(t) for t in tokens], np.int64)  # [N]
        total = np.array([t.sum() for t in tokens], np.float32)  # [N]
        return {"count": count, "score": np.stack([x.sum(1) + total, x[:, 0] * count], axis=1).astype(np.float32)}


def _rows(n: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    tokens = [rng.integers(0, 50, size=int(k)).astype(np.int32) for k in rng.integers(1, 5, size=n)]
    return x, tokens


@pytest.fixture(scope="module")
def pair_server():
    srv = start(LoadedPair(), ServeConfig(port=0))
    yield srv
    srv.stop()


def _client(srv):
    return triton.InferenceServerClient(f"127.0.0.1:{srv.port}")


def _raw(srv, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", "/v2/models/pair/infer", body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_metadata_lists_every_input_and_output_with_datatype_and_shape(pair_server):
    meta = _client(pair_server).get_model_metadata("pair")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "tokens", "datatype": "INT32", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "count", "datatype": "INT64", "shape": [-1]},
                               {"name": "score", "datatype": "FP32", "shape": [-1, 2]}]


@pytest.mark.parametrize("x_binary, tokens_binary", [(True, True), (False, False), (False, True)])
def test_tritonclient_gets_every_output_each_in_its_own_encoding(pair_server, x_binary, tokens_binary):
    x, _ = _rows(2)
    tokens = np.array([[1, 2, 3], [4, 5, 6]], np.int32)  # one request: rows of one length
    a = triton.InferInput("x", [2, 3], "FP32")
    a.set_data_from_numpy(x, binary_data=x_binary)
    b = triton.InferInput("tokens", [2, 3], "INT32")
    b.set_data_from_numpy(tokens, binary_data=tokens_binary)
    outputs = [triton.InferRequestedOutput("score", binary_data=False),
               triton.InferRequestedOutput("count", binary_data=True)]
    result = _client(pair_server).infer("pair", [a, b], outputs=outputs, request_id="r1")
    expect = LoadedPair().predict({"x": x, "tokens": list(tokens)})
    reply = result.get_response()
    assert [o["name"] for o in reply["outputs"]] == ["score", "count"] and reply["id"] == "r1"
    assert "data" in reply["outputs"][0] and reply["outputs"][1]["parameters"]["binary_data_size"] == 16
    assert result.as_numpy("count").dtype == np.int64 and result.as_numpy("score").dtype == np.float32
    np.testing.assert_array_equal(result.as_numpy("count"), expect["count"])
    np.testing.assert_array_equal(result.as_numpy("score"), expect["score"])
    only = _client(pair_server).infer("pair", [a, b], outputs=[triton.InferRequestedOutput("count")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["count"]


def _tensor(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


X = _tensor("x", "FP32", [1, 3], [1.0, 2.0, 3.0])
TOKENS = _tensor("tokens", "INT32", [1, 2], [4, 5])


@pytest.mark.parametrize("inputs, outputs, message", [
    ([{**X, "datatype": "INT32"}, TOKENS], None, "input 'x' has datatype 'INT32'; expected 'FP32'"),
    ([{**X, "shape": [1, 4], "data": [1, 2, 3, 4]}, TOKENS], None, "input 'x' has shape [1, 4]; expected [N, 3]"),
    ([X, {**TOKENS, "shape": [2]}], None, "input 'tokens' has shape [2]; expected [N, ?]"),
    ([X, {**TOKENS, "shape": [2, 1]}], None, "input 'tokens' has 2 rows but input 'x' has 1"),
    ([X], None, "input 'tokens' is missing; this model takes inputs ['x', 'tokens']"),
    ([X, TOKENS, {**X, "name": "y"}], None, "unknown input 'y'"),
    ([X, {**TOKENS, "data": [4, 5.5]}], None, "input 'tokens' element 1 is 5.5; INT32 elements in JSON must be integers"),
    ([X, {**TOKENS, "data": [4, 2**40]}], None, "does not fit INT32"),
    ([{**X, "data": [1.0, "2", 3.0]}, TOKENS], None, "input 'x' element 1 is '2'"),
    ([X, TOKENS], [{"name": "logits"}], "unknown output 'logits'; this model's outputs are ['count', 'score']"),
    ([X, TOKENS], [{"name": "count"}, {"name": "count"}], "output 'count' is requested twice"),
])
def test_inputs_that_do_not_match_the_signature_get_400_naming_the_tensor(pair_server, inputs, outputs, message):
    body = {"inputs": inputs} | ({"outputs": outputs} if outputs is not None else {})
    status, reply = _raw(pair_server, json.dumps(body).encode())
    assert status == 400 and message in reply["error"], reply


def test_binary_input_of_the_wrong_size_is_400_with_the_size_it_needs(pair_server):
    raw = np.zeros((2, 3), "<f4").tobytes()[:-4]
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                     "parameters": {"binary_data_size": len(raw)}},
                                    _tensor("tokens", "INT32", [2, 1], [1, 2])]}).encode()
    status, reply = _raw(pair_server, header + raw, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary_data_size is 20 bytes but shape [2, 3] of FP32 needs 24" in reply["error"]


def test_a_request_the_model_fails_on_is_500_and_the_server_goes_on(pair_server):
    status, reply = _raw(pair_server, json.dumps({"inputs": [X, {**TOKENS, "data": [4, -1]}]}).encode())
    assert status == 500 and "token ids must be >= 0" in reply["error"]
    status, reply = _raw(pair_server, json.dumps({"inputs": [X, TOKENS]}).encode())
    assert status == 200 and [o["data"] for o in reply["outputs"]] == [[2], [15.0, 2.0]]


def test_a_lost_device_is_503_not_the_rows_fault(pair_server):
    status, reply = _raw(pair_server, json.dumps({"inputs": [X, {**TOKENS, "data": [4, 999]}]}).encode())
    assert status == 503 and "the model is unavailable: JaxRuntimeError: INTERNAL: device lost" in reply["error"]
    status, reply = _raw(pair_server, json.dumps({"inputs": [X, TOKENS]}).encode())
    assert status == 200


def test_zero_rows_get_empty_outputs_of_the_declared_shapes(pair_server):
    body = {"inputs": [_tensor("x", "FP32", [0, 3], []), _tensor("tokens", "INT32", [0, 0], [])]}
    status, reply = _raw(pair_server, json.dumps(body).encode())
    assert status == 200
    assert [(o["name"], o["datatype"], o["shape"], o["data"]) for o in reply["outputs"]] == [
        ("count", "INT64", [0], []), ("score", "FP32", [0, 2], [])]


def test_the_batcher_merges_dict_requests_into_one_call_and_splits_every_output():
    model = LoadedPair()
    x, tokens = _rows(5, seed=3)
    # max_batch_rows 5: the batcher waits (up to an hour) until both requests' 5 rows are queued.
    batcher = DynamicBatcher(model.predict, max_batch_rows=5, max_queue_delay_s=3600)
    try:
        first = batcher.submit({"x": x[:2], "tokens": tokens[:2]})
        second = batcher.submit({"x": x[2:], "tokens": tokens[2:]})
        got = [first.result(30), second.result(30)]
    finally:
        batcher.close(30)
    assert model.calls == [5] and batcher.stats.calls == 1 and batcher.stats.requests == 2
    expect = LoadedPair().predict({"x": x, "tokens": tokens})
    for name in ("count", "score"):
        np.testing.assert_array_equal(np.concatenate([got[0][name], got[1][name]]), expect[name])
        assert len(got[0][name]) == 2 and len(got[1][name]) == 3


def test_remote_model_builds_the_signature_from_metadata_and_predicts_like_local(pair_server):
    loaded = RemoteModel(url=pair_server.url, name="pair", chunk_rows=2, max_in_flight=3).load()
    assert loaded.inputs == INPUTS and loaded.outputs == OUTPUTS
    x, tokens = _rows(11, seed=1)  # lengths 1-4 mixed: one request per length, at most 2 rows each
    got = loaded.predict({"x": x, "tokens": tokens})
    expect = LoadedPair().predict({"x": x, "tokens": tokens})
    for name in ("count", "score"):
        assert got[name].dtype == expect[name].dtype
        np.testing.assert_array_equal(got[name], expect[name])  # rows back in input order
    assert set(RemoteModel(url=pair_server.url, name="pair", output_names=("score",)).load().predict(
        {"x": x[:1], "tokens": tokens[:1]})) == {"score"}
    with pytest.raises(ValueError, match="has no output 'label'; its outputs are \\['count', 'score'\\]"):
        RemoteModel(url=pair_server.url, name="pair", output_names=("label",)).load()
    with pytest.raises(TypeError, match="one text input"):
        loaded.embed(["text"])


def test_remote_model_raises_remote_error_for_rows_the_server_rejects(pair_server):
    loaded = RemoteModel(url=pair_server.url, name="pair", retry=RetryPolicy(attempts_on_500=1)).load()
    with pytest.raises(RemoteError, match="HTTP 500.*token ids must be >= 0"):
        loaded.predict({"x": np.zeros((1, 3), np.float32), "tokens": [np.array([-1], np.int32)]})


def _pipeline_rows() -> list[dict]:
    x, tokens = _rows(24, seed=2)
    rows = [{"id": i, "x": x[i].tolist(), "tokens": tokens[i].tolist()} for i in range(24)]
    rows.append({"id": 100, "x": [1.0, 2.0], "tokens": [1]})  # wrong shape: a dead letter
    rows.append({"id": 101, "x": [1.0, 2.0, 3.0], "tokens": [3, -1]})  # the model fails on it alone
    return rows



def _same_rows(joined):
    """(id, {"local": [row], "remote": [row]}) for every predicted row: each side once, equal fields."""
    assert sorted(i for i, _ in joined) == list(range(24))
    for _, sides in joined:
        (local,), (remote,) = sides["local"], sides["remote"]
        assert set(remote) == set(local) == {"id", "x", "tokens", "count", "score"}
        assert remote["count"] == local["count"] == len(local["tokens"]) and isinstance(remote["count"], np.integer)
        assert remote["score"].dtype == local["score"].dtype == np.float32
        np.testing.assert_array_equal(remote["score"], local["score"])


def _same_failures(joined):
    errors = {i: (sides["local"], sides["remote"]) for i, sides in joined}
    assert sorted(errors) == [100, 101]
    for want, i in (("field 'x' has shape [2], expected [3]", 100), ("token ids must be >= 0", 101)):
        (local,), (remote,) = errors[i]
        assert want in local and want in remote, (local, remote)


def test_bulk_inference_with_server_gives_the_same_rows_as_local(pair_server):
    with test_pipeline.TestPipeline() as p:
        rows = p | beam.Create(_pipeline_rows())
        local, local_failed = rows | "Local" >> BulkInference(PairModel(), flush_rows=8).with_exception_handling()
        remote, remote_failed = (rows | "Remote" >> BulkInference(PairModel(), server=pair_server.url, flush_rows=8)
                                 .with_exception_handling())
        by_id = {side: pcoll | f"Key{side}" >> beam.Map(lambda r: (r["id"], r))
                 for side, pcoll in (("local", local), ("remote", remote))}
        assert_that(by_id | "Join" >> beam.CoGroupByKey(), _same_rows, label="rows")
        failed = {side: pcoll | f"KeyFailed{side}" >> beam.Map(lambda f: (f["id"], f["error"]))
                  for side, pcoll in (("local", local_failed), ("remote", remote_failed))}
        assert_that(failed | "JoinFailed" >> beam.CoGroupByKey(), _same_failures, label="failed")


def test_concurrent_tritonclient_requests_share_model_calls(pair_server):
    model = LoadedPair()
    srv = start(model, ServeConfig(port=0, max_queue_delay_ms=60_000, max_batch_rows=6))  # fires at 6 rows
    try:
        x, _ = _rows(6, seed=4)
        results: dict[int, dict] = {}

        def one(i):
            a = triton.InferInput("x", [1, 3], "FP32")
            a.set_data_from_numpy(x[i : i + 1])
            b = triton.InferInput("tokens", [1, i + 1], "INT32")  # a different length per request
            b.set_data_from_numpy(np.arange(i + 1, dtype=np.int32)[None])
            r = _client(srv).infer("pair", [a, b])
            results[i] = {"count": r.as_numpy("count"), "score": r.as_numpy("score")}

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert model.calls == [6]  # six requests of six lengths, one model call
        expect = LoadedPair().predict({"x": x, "tokens": [np.arange(i + 1, dtype=np.int32) for i in range(6)]})
        for i in range(6):
            assert results[i]["count"].tolist() == [i + 1]
            np.testing.assert_array_equal(results[i]["score"][0], expect["score"][i])
    finally:
        srv.stop()


def test_unknown_model_name_is_still_404_through_tritonclient(pair_server):
    with pytest.raises(InferenceServerException, match="not served here"):
        _client(pair_server).get_model_metadata("digits")


def test_start_refuses_an_object_that_is_not_a_loaded_model():
    class EmbedOnly:
        name = "old"

        def embed(self, texts):
            return np.zeros((len(texts), 2), np.float32)

    with pytest.raises(TypeError, match="EmbedOnly is not a loaded model: it has no inputs, outputs, predict"):
        start(EmbedOnly(), ServeConfig(port=0))
