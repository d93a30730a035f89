"""The v2 wire format: BYTES elements, body splitting and output decoding, without a server."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkinfer.serve import protocol
from bulkinfer.serve.protocol import ProtocolError


@given(st.lists(st.text(max_size=40), max_size=20))
def test_bytes_round_trip(texts):
    raw = protocol.encode_bytes(texts)
    assert [b.decode() for b in protocol.decode_bytes(raw, len(texts), name="text")] == texts


def test_bytes_layout_is_4_byte_little_endian_length_then_bytes():
    assert protocol.encode_bytes(["ab", "é"]) == b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa9"


@pytest.mark.parametrize("raw, count, message", [
    (b"\x05\x00\x00\x00ab", 1, "declares 5 bytes"),
    (b"\x01\x00", 1, "inside element 0"),
    (b"\x01\x00\x00\x00ab", 1, "1 bytes left over"),
    (b"\x01\x00\x00\x00a", 2, "inside element 1"),
])
def test_bytes_decode_rejects_sizes_that_do_not_add_up(raw, count, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.decode_bytes(raw, count, name="text")


def test_split_body_with_header_length_and_binary_parts():
    header, tail = protocol.encode_infer_request("text", ["x", "yz"], output="embedding")
    obj, rest = protocol.split_body(header + tail, str(len(header)))
    parts = protocol.binary_parts(obj["inputs"], rest, kind="input")
    assert protocol.decode_bytes(parts[0], 2, name="text") == [b"x", b"yz"]
    assert obj["outputs"] == [{"name": "embedding", "parameters": {"binary_data": True}}]


def test_split_body_rejects_a_header_length_past_the_body():
    with pytest.raises(ProtocolError, match="body has 2 bytes"):
        protocol.split_body(b"{}", "10")


def test_binary_parts_rejects_unaccounted_trailing_bytes():
    with pytest.raises(ProtocolError, match="3 binary bytes"):
        protocol.binary_parts([{"name": "text", "data": ["a"]}], memoryview(b"abc"), kind="input")


def test_decode_output_json_and_binary_agree():
    emb = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    as_json = json.dumps({"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [2, 3],
                                       "data": emb.ravel().tolist()}]}).encode()
    raw = emb.astype("<f4").tobytes()
    head = json.dumps({"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [2, 3],
                                    "parameters": {"binary_data_size": len(raw)}}]}).encode()
    np.testing.assert_array_equal(protocol.decode_output(as_json, None, "embedding"), emb)
    np.testing.assert_array_equal(protocol.decode_output(head + raw, str(len(head)), "embedding"), emb)
    with pytest.raises(ProtocolError, match="no output 'logits'"):
        protocol.decode_output(as_json, None, "logits")


def test_flatten_nested_json_data():
    assert protocol.flatten([["a"], ["b", ["c"]]], name="text") == ["a", "b", "c"]


def test_backoff_is_jittered_exponential_but_never_sooner_than_retry_after():
    import random

    from bulkinfer.serve.remote_model import RetryPolicy
    from bulkinfer.serve.v2_client import _retry_after

    policy, rng = RetryPolicy(base_s=0.1, max_backoff_s=5.0), random.Random(0)
    delays = [policy.backoff(k, rng) for k in range(1, 8)]
    caps = [min(5.0, 0.1 * 2**k) for k in range(1, 8)]
    assert all(cap / 2 <= d <= cap for cap, d in zip(caps, delays))
    assert policy.backoff(1, rng, retry_after_s=3.0) == 3.0  # the server asked for 3 s
    assert _retry_after({"Retry-After": "2"}) == 2.0 and _retry_after({"Retry-After": "Wed, 21 Oct 2026"}) is None
    assert _retry_after({}) is None


def test_an_unreadable_reply_is_model_unavailable_not_a_row_error():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pytest

    from bulkinfer.errors import ModelUnavailable
    from bulkinfer.serve.v2_client import V2Client

    class NotV2(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"outputs": "not a list"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotV2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ModelUnavailable, match="not a v2 response"):
            V2Client(f"http://127.0.0.1:{server.server_address[1]}").infer("m", ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()
