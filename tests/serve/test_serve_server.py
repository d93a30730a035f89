"""`bulkinfer serve` driven by NVIDIA's tritonclient (a v2 client we did not write) and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bulkinfer.serve import ServeConfig, start

TEXTS = ["hello world", "Bulk inference on Beam.", "héllo 🙂 wörld", ""]


def _client(srv, **kw):
    return triton.InferenceServerClient(f"127.0.0.1:{srv.port}", **kw)


def _infer(client, texts, *, binary_in=True, binary_out=True, headers=None):
    inp = triton.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary_in)
    out = triton.InferRequestedOutput("embedding", binary_data=binary_out)
    return client.infer("minilm", [inp], outputs=[out], request_id="req-7", headers=headers)


def _raw(srv, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if r.getheader("Content-Type") == "application/json" else data)
    finally:
        conn.close()


def test_health_and_metadata_through_tritonclient(server):
    c = _client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("minilm")
    assert not c.is_model_ready("no-such-model")
    meta = c.get_model_metadata("minilm")
    assert meta["name"] == "minilm" and meta["platform"] == "bulkinfer"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False)])
def test_infer_matches_local_engine(server, embedder, binary_in, binary_out):
    result = _infer(_client(server), TEXTS, binary_in=binary_in, binary_out=binary_out)
    emb = result.as_numpy("embedding")
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(emb, embedder.embed(TEXTS), atol=1e-6)
    assert result.get_response()["id"] == "req-7"


def _body(inputs, outputs=None) -> bytes:
    req = {"inputs": inputs}
    if outputs is not None:
        req["outputs"] = outputs
    return json.dumps(req).encode()


GOOD = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}


@pytest.mark.parametrize("path, body, headers, status, message", [
    ("/v2/models/minilm/infer", b"{not json", {}, 400, "malformed"),
    ("/v2/models/minilm/infer", b"[1, 2]", {}, 400, "JSON object"),
    ("/v2/models/minilm/infer", _body([]), {}, 400, "non-empty list"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "datatype": "FP32"}]), {}, 400, "datatype 'FP32'; expected 'BYTES'"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "shape": [2]}]), {}, 400, "needs 2 elements, data has 1"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "shape": [1, 2]}]), {}, 400, "expected [N]"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "shape": "1"}]), {}, 400, "list of non-negative ints"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "name": "txt"}]), {}, 400, "unknown input 'txt'"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "data": [3]}]), {}, 400, "element 0 is int"),
    ("/v2/models/minilm/infer", _body([{k: v for k, v in GOOD.items() if k != "data"}]), {}, 400, "neither 'data'"),
    ("/v2/models/minilm/infer", _body([GOOD], [{"name": "logits"}]), {}, 400, "unknown output 'logits'"),
    ("/v2/models/minilm/infer", b'{"inputs": []}xx', {"Inference-Header-Content-Length": "99"}, 400, "body has 16"),
    ("/v2/models/minilm/infer", _body([{**GOOD, "parameters": {"binary_data_size": 9}}]),
     {"Inference-Header-Content-Length": "0"}, 400, "malformed"),
    ("/v2/models/other/infer", _body([GOOD]), {}, 404, "model 'other' is not served here"),
    ("/v2/models/minilm/infer", b"", {"Content-Encoding": "gzip"}, 415, "gzip"),
    ("/v2/nothing", b"", {}, 404, "no route"),
])
def test_malformed_requests_get_4xx_with_a_reason_and_the_server_stays_up(server, path, body, headers, status, message):
    got, reply = _raw(server, "POST", path, body, headers)
    assert got == status
    assert message in reply["error"]
    assert _client(server).is_server_live()
    assert _infer(_client(server), ["still fine"]).as_numpy("embedding").shape == (1, 384)


def test_binary_input_with_wrong_size_is_400(server):
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": 7}}]}).encode()
    tail = b"\x02\x00\x00\x00abX"  # one 2-byte element and a stray byte; the shape says 2 elements
    status, reply = _raw(server, "POST", "/v2/models/minilm/infer", header + tail,
                         {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "inside element 1" in reply["error"]


def test_wrong_method_is_405(server):
    status, reply = _raw(server, "GET", "/v2/models/minilm/infer")
    assert status == 405 and "takes POST" in reply["error"]


def test_concurrent_requests_share_model_calls_and_get_their_own_rows(embedder):
    srv = start(embedder, ServeConfig(port=0, max_queue_delay_ms=1000))  # room for 8 threads to start
    try:
        texts = [f"request number {i} about beam" for i in range(8)]
        results: dict[int, np.ndarray] = {}

        def one(i):
            results[i] = _infer(_client(srv), [texts[i]]).as_numpy("embedding")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = _client(srv).get_inference_statistics("minilm")["model_stats"][0]
        assert stats["request_count"] == 8 and stats["inference_count"] == 8
        assert stats["execution_count"] <= 3  # merged: 8 requests, at most a few model calls
        expect = embedder.embed(texts)
        for i in range(len(texts)):
            np.testing.assert_allclose(results[i][0], expect[i], atol=1e-6)
    finally:
        srv.stop()


def test_token_is_required_everywhere_but_health(embedder):
    srv = start(embedder, ServeConfig(port=0, token="s3cret"))
    try:
        anonymous = _client(srv)
        assert anonymous.is_server_live() and anonymous.is_server_ready()
        with pytest.raises(InferenceServerException, match="bearer token"):
            anonymous.get_model_metadata("minilm")
        with pytest.raises(InferenceServerException, match="wrong bearer token"):
            _infer(anonymous, ["x"], headers={"Authorization": "Bearer guess"})
        assert _raw(srv, "POST", "/v2/models/minilm/infer", _body([GOOD]))[0] == 401
        ok = _infer(anonymous, ["x"], headers={"Authorization": "Bearer s3cret"})
        assert ok.as_numpy("embedding").shape == (1, 384)
    finally:
        srv.stop()


def test_oversize_body_is_413_before_it_is_read(embedder):
    srv = start(embedder, ServeConfig(port=0, max_request_bytes=4096))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        # Announce 10 MB but send only the headers: the answer must come without waiting for the body.
        conn.putrequest("POST", "/v2/models/minilm/infer")
        conn.putheader("Content-Length", str(10_000_000))
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 413
        assert "at most 4096" in json.loads(r.read())["error"]
        assert r.getheader("Connection") == "close"
        conn.close()
        with pytest.raises(InferenceServerException, match="413|at most 4096"):
            _infer(_client(srv), ["x" * 5000])
        assert _infer(_client(srv), ["small"]).as_numpy("embedding").shape == (1, 384)
    finally:
        srv.stop()
