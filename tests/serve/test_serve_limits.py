"""The server's limits, over raw sockets: connections past --max-connections get 503 with Retry-After, a
body or a head trickled in slowly is cut off, percent-escaped model names route, hostile text in a
request cannot break a JSON reply.  No test waits a fixed time: each waits for the server's answer, or
polls a condition, under a generous deadline."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import numpy as np
import pytest

from bulkinfer.models.signature import TEXT, TensorSpec
from bulkinfer.serve import RemoteModel, ServeConfig, V2Client, connections, server, start

DEADLINE_S = 30.0  # generous: only a broken server takes this long


class FakeEmbedder:
    """A loaded model for the server (the model contract): text -> embedding [len(text), number of spaces]."""

    load_s = 0.0
    inputs = (TensorSpec("text", (), TEXT),)
    outputs = (TensorSpec("embedding", (2,), "float32"),)

    def __init__(self, name: str = "my-model"):
        self.name = name

    def predict(self, inputs, stats=None):
        texts = inputs["text"]
        return {"embedding": np.array([[len(t), t.count(" ")] for t in texts], np.float32).reshape(len(texts), 2)}


@pytest.fixture
def serve():
    started = []

    def make(name: str = "my-model", **config) -> server.Server:
        srv = start(FakeEmbedder(name), ServeConfig(port=0, **config))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def _request(port: int, method: str, path: str, body: bytes = b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def _infer_body(texts) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}).encode()


def _kept_alive(port: int) -> socket.socket:
    """A connection the server is serving (one request answered on it), left open and idle."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    r = http.client.HTTPResponse(s)
    r.begin()
    assert r.status == 200 and r.getheader("Connection") != "close"
    r.read()
    return s


def _until(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.01)


def test_a_connection_over_the_limit_gets_503_with_retry_after_and_a_freed_slot_serves_again(serve):
    srv = serve(max_connections=2)
    holders = [_kept_alive(srv.port), _kept_alive(srv.port)]
    assert srv.connections == 2
    status, headers, reply = _request(srv.port, "POST", "/v2/models/my-model/infer", _infer_body(["a b"]))
    assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
    assert "maximum of 2 connections" in reply["error"] and "--max-connections" in reply["error"]
    assert _request(srv.port, "GET", "/v2/health/ready")[0] == 503
    assert _request(srv.port, "GET", "/v2/health/live")[:3:2] == (200, {"live": True})  # the process is alive
    assert srv.connections == 2  # the rejected ones never took a slot
    # The kept-alive connections are still served.
    holders[0].sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    r = http.client.HTTPResponse(holders[0])
    r.begin()
    assert r.status == 200
    r.read()
    holders[1].close()
    _until(lambda: srv.connections == 1, "the closed connection's slot is free")
    status, _, reply = _request(srv.port, "POST", "/v2/models/my-model/infer", _infer_body(["a b", "xyz"]))
    assert status == 200 and reply["outputs"][0]["data"] == [3.0, 1.0, 3.0, 0.0]
    holders[0].close()


def test_the_client_retries_a_503_for_lack_of_connections_until_one_is_free(serve):
    srv = serve(max_connections=1)
    holder = _kept_alive(srv.port)
    sleeps = []

    def sleep(s):  # the client's backoff; the slot frees on the second retry
        sleeps.append(s)
        if len(sleeps) == 2:
            holder.close()
            _until(lambda: srv.connections == 0, "the holder's slot is free")

    from bulkinfer.serve.remote_model import LoadedRemoteModel

    spec = RemoteModel(url=srv.url, name="my-model", retry=server_retry())
    loaded = LoadedRemoteModel(spec, sleep=sleep)
    np.testing.assert_array_equal(loaded.embed(["a b c"]), [[5, 2]])
    assert sleeps == [1.0, 1.0]  # Retry-After: 1, longer than the backoff


def server_retry():
    from bulkinfer.serve import RetryPolicy

    return RetryPolicy(budget_s=60, base_s=0.01, max_backoff_s=0.02)


def test_past_the_rejection_limit_a_connection_is_closed_at_once(serve, monkeypatch):
    monkeypatch.setattr(connections, "MAX_REJECTING", 1)
    monkeypatch.setattr(connections, "REJECT_TIMEOUT_S", DEADLINE_S)
    srv = serve(max_connections=1)
    holder = _kept_alive(srv.port)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE_S)  # held in its rejection
    flood = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE_S)
    flood.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert flood.recv(1024) == b""  # closed unanswered, not left hanging
    except ConnectionResetError:
        pass
    silent.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert silent.recv(1024).startswith(b"HTTP/1.1 503 ")  # the rejection in progress still answers
    for s in (holder, silent, flood):
        s.close()


def test_a_body_trickled_past_body_timeout_gets_408_however_often_bytes_arrive(serve):
    srv = serve(body_timeout_s=0.5, idle_timeout_s=DEADLINE_S)  # no single wait ever reaches the idle timeout
    with socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE_S) as s:
        s.sendall(b"POST /v2/models/my-model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        sent, deadline = 0, time.monotonic() + DEADLINE_S
        while not select.select([s], [], [], 0.02)[0]:  # one byte every 20 ms until the server answers
            assert time.monotonic() < deadline, "no answer to a body trickled for 30 s"
            s.sendall(b" ")
            sent += 1
        r = http.client.HTTPResponse(s)
        r.begin()
        error = json.loads(r.read())["error"]
    assert r.status == 408 and r.getheader("Connection") == "close"
    assert "100000-byte body did not arrive within 0.5 s" in error
    assert sent > 1  # it kept arriving, so only the total bound could end it
    assert _request(srv.port, "GET", "/v2/health/ready")[0] == 200


def test_a_head_trickled_past_idle_timeout_is_closed(serve):
    srv = serve(idle_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE_S) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + DEADLINE_S
        closed = False
        while not closed:
            assert time.monotonic() < deadline, "a head trickled for 30 s is still being read"
            if select.select([s], [], [], 0.02)[0]:
                try:
                    closed = s.recv(1024) == b""
                except ConnectionResetError:
                    closed = True
                assert closed, "the server answered a request whose head never ended"
            else:
                try:
                    s.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
    _until(lambda: srv.connections == 0, "the connection's slot is free")
    assert _request(srv.port, "GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("path", ["/v2/models/my%2Dmodel", "/v2/models/my%2dmodel/versions/1", "/v2/models/%6Dy-model"])
def test_percent_escaped_model_names_route(serve, path):
    srv = serve()
    status, _, meta = _request(srv.port, "GET", path)
    assert status == 200 and meta["name"] == "my-model"
    status, _, reply = _request(srv.port, "POST", path + "/infer", _infer_body(["x y"]))
    assert status == 200 and reply["outputs"][0]["data"] == [3.0, 1.0]


def test_escapes_that_name_no_model_or_are_not_utf8_are_4xx(serve):
    srv = serve()
    status, _, reply = _request(srv.port, "GET", "/v2/models/my%2Fmodel")
    assert status == 404 and "'my/model' is not served here" in reply["error"]
    status, _, reply = _request(srv.port, "GET", "/v2/models/%FF/ready")
    assert status == 400 and "not UTF-8" in reply["error"]


def test_a_model_name_that_needs_escaping_works_through_the_client(serve):
    srv = serve(name="my model/é")
    loaded = RemoteModel(url=srv.url, name="my model/é").load()
    np.testing.assert_array_equal(loaded.embed(["a b", ""]), [[3, 1], [0, 0]])
    assert V2Client(srv.url).model_stats("my model/é")["model_stats"][0]["inference_count"] == 2


def test_a_lone_surrogate_in_a_request_id_is_echoed_as_a_json_escape(serve):
    srv = serve()
    body = b'{"id": "r\\ud800", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}'
    status, _, reply = _request(srv.port, "POST", "/v2/models/my-model/infer", body)
    assert status == 200 and reply["id"] == "r\ud800"  # the reply is valid JSON, the id the same string
    body = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok\\ud800"]}]}'
    status, _, reply = _request(srv.port, "POST", "/v2/models/my-model/infer", body)
    assert status == 400 and "lone surrogate" in reply["error"]


@pytest.mark.parametrize("setting, message", [
    ({"max_connections": 0}, "max_connections must be >= 1"),
    ({"body_timeout_s": 0}, "body_timeout_s must be > 0"),
    ({"idle_timeout_s": -1}, "idle_timeout_s and body_timeout_s must be > 0"),
])
def test_bad_limits_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(**setting)
