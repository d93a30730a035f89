"""Property-based fuzz of a `bulkinfer serve` process over raw sockets.

Hypothesis builds whole HTTP requests: arbitrary JSON, near-valid v2 infer bodies (wrong datatypes, shapes
that do not match the data, nested lists, huge or negative shapes, non-UTF-8 BYTES), the binary tensor
extension with wrong, negative or overflowing sizes, truncated bodies, random bytes, wrong Content-Type,
missing or garbage Content-Length, unknown methods and paths, path traversal in model names, over-long
headers.  Whatever it sends, the server must answer 2xx or a 4xx JSON `{"error": "..."}` (never 5xx: the
server is ready throughout), answer 200 without the token only on /v2/health/*, stay alive and ready, and
keep its memory bounded.  The examples are derandomized, so a CI run sends the same requests every time.
"""

from __future__ import annotations

import collections
import http.client
import json
import socket
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bulkinfer.serve import ServeConfig, V2Client, start
from bulkinfer.serve.protocol import encode_bytes

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
LIMIT = 65536  # --max-request-bytes of the fuzzed server
INFER = "/v2/models/minilm/infer"
# RSS growth allowed over the whole fuzz run.  The requests are at most ~70 KB and the valid ones at most 4
# rows, so nothing should be kept: what does grow is allocator slack and XLA executables for shapes the
# warm-up missed (a few MB each).  200 MB catches a leak of even ~0.5 MB per request over the ~300 requests.
RSS_GROWTH_MB = 200
FUZZ_EXAMPLES = 300


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture(scope="module")
def fuzzed(module_server_process):
    """A `bulkinfer serve` process with a token and a 64 KiB body limit, warmed up on 1-4 rows."""
    sp = module_server_process("--token", TOKEN, "--max-request-bytes", str(LIMIT), "--max-length", "16")
    client = V2Client(sp.url, token=TOKEN, timeout_s=60)
    for n in range(1, 5):  # compile the shapes valid fuzz requests use, so compiles do not count as growth
        assert client.infer("minilm", ["warm up " * 8] * n).shape == (n, 384)
    return sp


def _exchange(port: int, request: bytes, method: str):
    """Sends raw request bytes, half-closes, reads one reply: (status, Content-Type, body, headers).
    None if the connection was reset before a reply came."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)  # a body shorter than its Content-Length ends here, not at a timeout
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all; its reply may be waiting
        r = http.client.HTTPResponse(s, method=method)
        try:
            r.begin()
            body = r.read()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            return None
        return r.status, r.getheader("Content-Type"), body, r.getheader("Connection")


# ---------------------------------------------------------------- strategies

_SAFE = string.ascii_letters + string.digits + "-._~%/?#=&:@!$'()*+,;[]"  # no whitespace: one path word
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)
_texts = st.lists(st.text(max_size=24), max_size=4)
_sizes = st.integers(-3, 3) | st.sampled_from([-(2**31), 2**31, 2**32 + 1, 2**63, 2**64 + 5, 10**30])


@st.composite
def _tensor(draw) -> dict:
    """A v2 input tensor that is valid, or wrong in one or two of its fields."""
    texts = draw(_texts)
    t = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters", "drop"]))
        if field == "name":
            t["name"] = draw(st.sampled_from(["txt", "", "TEXT"]) | _json)
        elif field == "datatype":
            t["datatype"] = draw(st.sampled_from(["FP32", "INT64", "BOOL", "bytes", "STRING"]) | _json)
        elif field == "shape":
            t["shape"] = draw(st.lists(_sizes, max_size=3) | st.just([len(texts), 1]) | st.just([1, len(texts)])
                              | _json)
        elif field == "data":
            t["data"] = draw(st.lists(_json, max_size=4) | st.just([texts]) | st.just([[x] for x in texts])
                             | st.lists(st.integers() | st.floats() | st.none(), max_size=3) | _json)
        elif field == "parameters":
            t["parameters"] = draw(st.fixed_dictionaries({"binary_data_size": _sizes}) | _json)
        else:
            t.pop(draw(st.sampled_from(sorted(t))))
    return t


@st.composite
def _infer_body(draw) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) of a near-valid infer request, JSON or binary."""
    req: dict = {"inputs": draw(st.lists(_tensor(), min_size=1, max_size=2) | _json)}
    if draw(st.booleans()):
        req["outputs"] = draw(st.just([{"name": "embedding", "parameters": {"binary_data": True}}])
                              | st.lists(st.fixed_dictionaries({"name": st.sampled_from(["embedding", "x"]),
                                                                "parameters": _json}), max_size=2) | _json)
    if draw(st.booleans()):
        req["id"] = draw(st.text(max_size=8) | _json)
    if draw(st.booleans()):
        req["parameters"] = draw(st.fixed_dictionaries({"binary_data_output": _json}) | _json)
    tail = b""
    if draw(st.booleans()):  # the binary extension: the input's bytes after the JSON
        values = draw(st.lists(st.text(max_size=16).map(str.encode) | st.binary(max_size=16), max_size=4))
        tail = encode_bytes(values)
        if draw(st.booleans()):  # truncated or padded
            cut = draw(st.integers(0, len(tail)))
            tail = tail[:cut] + draw(st.binary(max_size=8))
        size = len(tail) + draw(st.sampled_from([0, 0, 0, -1, 1]) | _sizes)
        if isinstance(req["inputs"], list) and req["inputs"] and isinstance(req["inputs"][0], dict):
            req["inputs"][0].pop("data", None)
            req["inputs"][0]["shape"] = [len(values)]
            req["inputs"][0]["parameters"] = {"binary_data_size": size}
    header = json.dumps(req).encode()
    ihcl = None
    if tail or draw(st.booleans()):
        ihcl = draw(st.just(str(len(header))) | st.integers(-5, len(header) + 5).map(str)
                    | st.sampled_from(["-1", "99999999999999999999", "1e3", "", "0x10", " 12 "]))
    return header + tail, ihcl


# Bodies no generator above writes: parser limits and Unicode edge cases.
_NASTY = [
    b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nesting past the recursion limit
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [' + b"[" * 990 + b"]" * 990 + b"]}]}",
    b'{"inputs": ' + b"7" * 5000 + b"}",  # an integer over Python's 4300-digit limit
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',  # lone surrogate
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a\\u0000b"]}]}',
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [NaN], "data": [Infinity]}]}',
    b"\xef\xbb\xbf" + json.dumps({"inputs": []}).encode(),  # UTF-8 BOM
    json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode("utf-16"),
    b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}], "id": ' + b"[" * 980
    + b"]" * 980 + b"}",
]

_MODEL_NAMES = st.sampled_from(["minilm", "..", "../minilm", "minilm/..", "%2e%2e%2fminilm", "....//", "~root",
                                "minilm%00", "MINILM", "x" * 300]) | st.text(_SAFE, min_size=1, max_size=20)


def _weighted(*pairs):
    """st.one_of with weights: _weighted(3, a, 1, b) draws from a three times as often as from b."""
    weights, strategies = pairs[::2], pairs[1::2]
    return st.sampled_from([i for i, w in enumerate(weights) for _ in range(w)]).flatmap(lambda i: strategies[i])


@st.composite
def _request(draw) -> dict:
    """A whole HTTP request as bytes plus what the checks need to know about it."""
    # Mostly well-formed requests to the infer route, so that most examples get past auth and routing.
    method = draw(_weighted(8, st.just("POST"), 1, st.sampled_from(["GET", "PUT", "DELETE", "HEAD", "OPTIONS"]),
                            1, st.text(string.ascii_letters + "-_", min_size=1, max_size=10)))
    path = draw(_weighted(
        7, st.just(INFER), 1, _MODEL_NAMES.map(lambda m: f"/v2/models/{m}/infer"),
        1, _MODEL_NAMES.map(lambda m: f"/v2/models/{m}/versions/1/ready"),
        1, st.sampled_from(["/v2", "/v2/health/ready", "/v2/health/live", "/v2/models/minilm", "*",
                            "http://127.0.0.1/v2", "/v2/../../etc/passwd", "/v2/models/minilm/infer?x=1"]),
        1, st.text(_SAFE, min_size=1, max_size=40)))
    kind = draw(st.sampled_from(["infer"] * 4 + ["json", "bytes", "nasty", "empty"]))
    ihcl = None
    if kind == "infer":
        body, ihcl = draw(_infer_body())
    elif kind == "json":
        body = json.dumps(draw(_json)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=2000))
    elif kind == "nasty":
        body = draw(st.sampled_from(_NASTY))
    else:
        body = b""
    headers = [("Host", "127.0.0.1")]
    auth = draw(_weighted(8, st.just(f"Bearer {TOKEN}"), 1, st.sampled_from([None, "Bearer wrong", f"bearer{TOKEN}"]),
                          1, st.text(string.printable.strip(), max_size=40)))
    if auth is not None:
        headers.append(("Authorization", auth))
    ctype = draw(st.sampled_from(["application/json", "application/octet-stream", None, "text/plain",
                                  "application/json; charset=utf-16", "multipart/form-data; boundary=x"]))
    if ctype:
        headers.append(("Content-Type", ctype))
    length = draw(st.sampled_from(["exact"] * 6 + ["none", "short", "long", "over", "garbage", "negative", "huge"]))
    declared = {"exact": str(len(body)), "none": None, "short": str(max(len(body) - 3, 0)),
                "long": str(len(body) + 7), "over": str(LIMIT + 1 + draw(st.integers(0, 10**9))),
                "garbage": draw(st.sampled_from(["abc", "", "1.5", "0x10", "١٢", "12, 12"])),
                "negative": "-5", "huge": "9" * 30}[length]
    if declared is not None:
        headers.append(("Content-Length", declared))
    if ihcl is not None:
        headers.append(("Inference-Header-Content-Length", ihcl))
    for name in draw(st.lists(st.sampled_from(["Transfer-Encoding", "Content-Encoding", "Expect", "Connection"]),
                              max_size=2, unique=True)):
        headers.append((name, draw(st.sampled_from(["chunked", "gzip", "identity", "100-continue", "close",
                                                    "keep-alive", "\x7f\x80\xff"]))))
    oversized = False
    long_header = draw(st.sampled_from([None] * 8 + [1000, 60_000, 70_000, "many"]))
    if long_header == "many":  # more headers than http.client takes (100)
        headers += [(f"X-Fuzz-{i}", "y") for i in range(120)]
        oversized = True
    elif long_header:
        headers.append(("X-Fuzz", "v" * long_header))
        oversized = long_header > 65536
    return _raw(method, path, headers, body, oversized=oversized)


def _raw(method: str, path: str, headers: list[tuple[str, str]], body: bytes, *, oversized: bool = False) -> dict:
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return {"method": method, "path": path, "auth_ok": ("Authorization", f"Bearer {TOKEN}") in headers,
            "oversized": oversized, "bytes": head.encode("latin-1", "replace") + body}


def _example(body: bytes = b"", *, method: str = "POST", path: str = INFER, auth: bool = True,
             length: str | None = "exact", extra: tuple = (), oversized: bool = False) -> dict:
    headers = [("Host", "x")] + ([("Authorization", f"Bearer {TOKEN}")] if auth else []) + list(extra)
    if length is not None:
        headers.append(("Content-Length", str(len(body)) if length == "exact" else length))
    return _raw(method, path, headers, body, oversized=oversized)


_VALID = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}).encode()
# Hypothesis is derandomized, but it also mixes constants from the imported project modules into what it
# draws, so the random requests differ with what else the session imported.  These run every time and
# reach each layer: the model, auth, routing, the stdlib's parser limits, the body checks.
_EXAMPLES = [
    _example(_VALID), _example(_VALID, auth=False), _example(_VALID, method="PUT"), _example(_VALID, method="HEAD"),
    _example(_VALID, path="/v2/models/../infer"), _example(_VALID, length=None), _example(_VALID, length=str(LIMIT + 1)),
    _example(_VALID, length="nine"), _example(_VALID, extra=[("X-Long", "v" * 70_000)], oversized=True),
    _example(_VALID, extra=[("Inference-Header-Content-Length", "-1")]),
    _example(b'{"inputs": [{"name": "text", "parameters": [1]}]}'),
    *[_example(body) for body in _NASTY],
]


# ---------------------------------------------------------------- tests


def _assert_alive_and_ready(sp) -> None:
    assert sp.proc.poll() is None, f"the server died: {sp.log.read_text()[-3000:]}"
    client = V2Client(sp.url, token=TOKEN, timeout_s=60)
    assert client.ready()
    assert client.infer("minilm", ["still serving"]).shape == (1, 384)


def test_fuzzed_requests_get_2xx_or_4xx_json_and_the_server_stays_up_with_bounded_memory(fuzzed):
    rss_before = _rss_mb(fuzzed.proc.pid)
    statuses: collections.Counter = collections.Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(req=_request())
    def one(req):
        reply = _exchange(fuzzed.port, req["bytes"], req["method"])
        if reply is None:  # a header past the stdlib's limits, answered and closed before we finished sending
            assert req["oversized"], f"no reply to {req['method']} {req['path']}"
            assert fuzzed.proc.poll() is None
            statuses["reset"] += 1
            return
        status, ctype, body, _ = reply
        statuses[status] += 1
        assert status < 500, f"{req['method']} {req['path']} -> {status}: {body[:300]!r}"
        if status == 200:
            assert req["auth_ok"] or req["path"].split("?")[0].startswith("/v2/health/"), (req["path"], body[:200])
            assert ctype in ("application/json", "application/octet-stream"), ctype
        else:
            assert 400 <= status < 500, status
            if req["method"] != "HEAD":  # a HEAD reply has no body to read
                assert ctype == "application/json", (status, ctype, body[:200])
                error = json.loads(body)
                assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"], error
                assert len(error["error"]) < 2000, error  # client values are quoted short, not echoed whole

    for e in _EXAMPLES:
        one = example(req=e)(one)
    one()
    _assert_alive_and_ready(fuzzed)
    growth = _rss_mb(fuzzed.proc.pid) - rss_before
    assert growth < RSS_GROWTH_MB, f"the server's RSS grew {growth:.0f} MB over {FUZZ_EXAMPLES} fuzzed requests"
    # The fuzz reached every layer: the parser's rejections, auth, routing, the body checks, and the model.
    for status in (200, 400, 401, 404, 405, 411, 413):
        assert statuses[status] > 0, (status, statuses)


def test_oversize_body_gets_413_before_the_server_reads_it(fuzzed):
    for auth, want in ((f"Bearer {TOKEN}", 413), (None, 401)):
        # The rest of the body never comes: an answer at all means the server did not wait for it (were it
        # to wait, this socket would time out, well before the server's own 60 s body deadline).
        with socket.create_connection(("127.0.0.1", fuzzed.port), timeout=30) as s:
            head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT * 1000}\r\n"
            head += f"Authorization: {auth}\r\n" if auth else ""
            s.sendall(head.encode() + b"\r\n" + b'{"inputs": [')  # a few bytes of the 64 MB announced; no close
            r = http.client.HTTPResponse(s, method="POST")
            r.begin()
            error = json.loads(r.read())["error"]
            assert r.status == want, (r.status, error)
            assert r.getheader("Connection") == "close"  # the unread body is never parsed as a request
            if want == 413:
                assert f"at most {LIMIT}" in error
    _assert_alive_and_ready(fuzzed)


def test_a_get_body_is_not_taken_for_the_next_request(fuzzed):
    smuggled = f"POST {INFER} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode()
    request = (f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
               + smuggled)
    with socket.create_connection(("127.0.0.1", fuzzed.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1 ") == 1, received
    assert b"Connection: close" in received


def test_a_request_over_max_queue_rows_is_413(embedder):
    srv = start(embedder, ServeConfig(port=0, max_queue_rows=4))
    try:
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [5], "data": ["a"] * 5}]})
        reply = _exchange(srv.port, (f"POST {INFER} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
                                     + body).encode(), "POST")
        assert reply[0] == 413 and "at most 4 per request" in json.loads(reply[2])["error"]
        assert V2Client(srv.url).infer("minilm", ["a"] * 4).shape == (4, 384)
    finally:
        srv.stop()
