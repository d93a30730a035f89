"""`LoadedRemoteModel` against a scripted v2 server (a real `http.server` on loopback): 429 and 5xx retries,
Retry-After, the backoff and the retry budget (through the injected sleep and clock), and requests that
really overlap in flight (each held on a barrier until N have arrived).  Values are compared, not counts."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bulkinfer.errors import ModelUnavailable
from bulkinfer.serve import RemoteError, RemoteModel, RetryPolicy
from bulkinfer.serve.protocol import HEADER_LENGTH, decode_bytes, split_body
from bulkinfer.serve.remote_model import LoadedRemoteModel

DEADLINE_S = 30.0  # a barrier not met in this long means the requests did not overlap


def expected(texts) -> np.ndarray:
    """What the fake model answers: row i is [len(text), its first character's code point]."""
    return np.array([[len(t), ord(t[0]) if t else 0] for t in texts], np.float32).reshape(len(texts), 2)


class ScriptedServer:
    """A v2 server for model "fake" whose infer answers follow `script`, then 200 with `expected(texts)`.

    script: (status, headers) for the first infer requests, in order of arrival.
    barrier: if set, each infer request waits on it before answering (a 500 if it breaks).
    """

    def __init__(self, script=(), barrier: threading.Barrier | None = None, extensions=("binary_tensor_data",)):
        self.script = list(script)
        self.extensions = list(extensions)  # what GET /v2 lists; without binary_tensor_data, JSON only
        self.bodies: list[dict] = []  # the JSON part of each infer request
        self.barrier = barrier
        self.infers: list[list[str]] = []  # texts of each infer request, in order of arrival
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        if self.barrier is not None:
            self.barrier.abort()
        self.http.shutdown()
        self.http.server_close()

    def _infer(self, texts: list[str]) -> tuple[int, dict, dict]:
        with self.lock:
            self.infers.append(texts)
            step = self.script.pop(0) if self.script else (200, {})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                try:
                    self.barrier.wait(DEADLINE_S)
                except threading.BrokenBarrierError:
                    return 500, {}, {"error": f"only {self.barrier.n_waiting} requests were in flight at once"}
            status, headers = step
            if status != 200:
                return status, headers, {"error": f"scripted {status}"}
            emb = expected(texts)
            return 200, {}, {"model_name": "fake", "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": list(emb.shape), "data": emb.ravel().tolist()}]}
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/v2":
                    return self._reply(200, {}, {"name": "scripted", "extensions": fake.extensions})
                assert self.path == "/v2/models/fake", self.path
                self._reply(200, {}, {"name": "fake", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                                      "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 2]}]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                header, tail = split_body(body, self.headers.get(HEADER_LENGTH))
                fake.bodies.append(header)
                n = header["inputs"][0]["shape"][0]
                if "binary_tensor_data" not in fake.extensions:  # as MLServer: JSON or 422
                    if HEADER_LENGTH in self.headers or "data" not in header["inputs"][0]:
                        return self._reply(422, {}, {"error": "binary tensor data is not supported"})
                    return self._reply(*fake._infer(header["inputs"][0]["data"]))
                texts = [b.decode("utf-8") for b in decode_bytes(tail, n, name="text")]
                self._reply(*fake._infer(texts))

            def _reply(self, status, headers, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class FakeTime:
    """The client's injected clock and sleep: sleeping advances the clock; every sleep is recorded."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def scripted():
    servers = []

    def make(*script, barrier=None, **settings) -> ScriptedServer:
        servers.append(ScriptedServer(script, barrier, **settings))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _loaded(srv: ScriptedServer, t: FakeTime, **spec) -> LoadedRemoteModel:
    return LoadedRemoteModel(RemoteModel(url=srv.url, name="fake", **spec), sleep=t.sleep, clock=t.clock)


TEXTS = ["alpha", "bb", "", "δέλτα", "e" * 9]


def test_429_with_retry_after_waits_as_long_as_the_server_asks_then_gets_the_values(scripted):
    srv, t = scripted((429, {"Retry-After": "3"})), FakeTime()
    got = _loaded(srv, t, retry=RetryPolicy(base_s=0.1)).embed(TEXTS)
    np.testing.assert_array_equal(got, expected(TEXTS))
    assert t.sleeps == [3.0]  # the server's 3 s, not the ~0.1 s backoff
    assert srv.infers == [TEXTS, TEXTS]


def test_503_twice_backs_off_exponentially_with_jitter_then_gets_the_values(scripted):
    srv, t = scripted((503, {}), (503, {})), FakeTime()
    got = _loaded(srv, t, retry=RetryPolicy(base_s=0.1, max_backoff_s=5)).embed(TEXTS)
    np.testing.assert_array_equal(got, expected(TEXTS))
    assert len(t.sleeps) == 2
    assert 0.1 <= t.sleeps[0] <= 0.2 and 0.2 <= t.sleeps[1] <= 0.4  # retry k: in [base*2**k / 2, base*2**k]
    assert srv.infers == [TEXTS] * 3


def test_the_backoff_is_capped(scripted):
    srv, t = scripted(*[(502, {})] * 6), FakeTime()
    np.testing.assert_array_equal(_loaded(srv, t, retry=RetryPolicy(base_s=0.1, max_backoff_s=0.5)).embed(TEXTS),
                                  expected(TEXTS))
    assert len(t.sleeps) == 6 and all(0.25 <= s <= 0.5 for s in t.sleeps[2:])


def test_500_twice_gives_the_rows_up_to_bisection_after_attempts_on_500(scripted):
    srv, t = scripted((500, {}), (500, {})), FakeTime()
    with pytest.raises(RemoteError) as e:
        _loaded(srv, t, retry=RetryPolicy(attempts_on_500=2)).embed(TEXTS)
    assert e.value.status == 500 and "scripted 500" in str(e.value)
    assert len(srv.infers) == 2 and len(t.sleeps) == 1


def test_500_twice_with_three_attempts_gets_the_values(scripted):
    srv, t = scripted((500, {}), (500, {})), FakeTime()
    got = _loaded(srv, t, retry=RetryPolicy(attempts_on_500=3)).embed(TEXTS)
    np.testing.assert_array_equal(got, expected(TEXTS))
    assert len(srv.infers) == 3 and len(t.sleeps) == 2


def test_a_400_is_not_retried(scripted):
    srv, t = scripted((400, {})), FakeTime()
    with pytest.raises(RemoteError, match="HTTP 400"):
        _loaded(srv, t).embed(TEXTS)
    assert len(srv.infers) == 1 and t.sleeps == []


def test_past_the_retry_budget_the_call_is_unavailable_with_the_last_reason(scripted):
    srv, t = scripted(*[(503, {"Retry-After": "10"})] * 10), FakeTime()
    with pytest.raises(ModelUnavailable, match=r"infer failed 3 times in 20\.0 s \(retry budget 25 s\).*scripted 503"):
        _loaded(srv, t, retry=RetryPolicy(budget_s=25)).embed(TEXTS)
    assert t.sleeps == [10.0, 10.0]  # a third wait would end past the budget: given up instead
    assert len(srv.infers) == 3


def test_chunks_are_in_flight_at_once_and_come_back_in_order(scripted):
    srv = scripted(barrier=threading.Barrier(3))  # no request is answered until 3 have arrived
    texts = [f"{chr(97 + i)} row {i}" for i in range(12)]
    got = _loaded(srv, FakeTime(), chunk_rows=2, max_in_flight=3).embed(texts)
    np.testing.assert_array_equal(got, expected(texts))
    assert sorted(map(tuple, srv.infers)) == [tuple(texts[i:i + 2]) for i in range(0, 12, 2)]
    assert srv.max_in_flight == 3  # three overlapped (the barrier proves it), never more than max_in_flight


def test_one_chunk_failing_gives_up_the_whole_call(scripted):
    srv, t = scripted((400, {})), FakeTime()
    with pytest.raises(RemoteError, match="HTTP 400"):
        _loaded(srv, t, chunk_rows=1, max_in_flight=1).embed(TEXTS)
    assert len(srv.infers) == 1  # with one request in flight, the rest were never sent


def test_a_server_without_the_binary_extension_gets_json_both_ways(scripted):
    srv = scripted(extensions=[])  # GET /v2 lists no binary_tensor_data, as MLServer's does
    loaded = _loaded(srv, FakeTime())
    assert not loaded.binary
    np.testing.assert_array_equal(loaded.embed(TEXTS), expected(TEXTS))
    [body] = srv.bodies
    assert body["inputs"][0]["data"] == TEXTS and "binary_data_size" not in str(body)
    assert body["outputs"] == [{"name": "embedding"}]  # no binary_data parameter asked of such a server


def test_an_output_with_an_extra_unit_axis_gets_its_declared_shape(scripted):
    loaded = _loaded(scripted(), FakeTime())
    spec = dataclasses.replace(loaded.outputs[0], shape=(2,))
    loaded.outputs = (spec,)
    reply = {"embedding": np.arange(6, dtype=np.float32).reshape(3, 1, 2)}  # [N, 1, 2] for a declared [-1, 2]
    assert loaded._declared_shapes(reply)["embedding"].shape == (3, 2)
    other = {"embedding": np.zeros((3, 4), np.float32)}  # a real mismatch is left for the checks downstream
    assert loaded._declared_shapes(other)["embedding"].shape == (3, 4)
