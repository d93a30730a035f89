"""A small Open Inference Protocol (v2 REST) client: one server, its metadata, and `infer` requests with
tensors as binary data or JSON.  `RemoteModel` (`bulkinfer.serve.remote_model`) builds on it.

    client = V2Client("http://127.0.0.1:8000")
    client.ready(); client.model_metadata("digits")["outputs"]
    client.infer("minilm", ["a text"])                  # [1, 384] float32: a text model's output

Each thread keeps its own keep-alive connection.  An error the server answers raises `RemoteError` with
its HTTP status and the server's `error` text (and its Retry-After, if any); a reply that is not a v2
response raises `ModelUnavailable`.  Wire format: `bulkinfer.serve.protocol`.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections.abc import Sequence

import numpy as np

from bulkinfer.errors import ModelUnavailable
from bulkinfer.serve import protocol


class RemoteError(RuntimeError):
    """The server answered an error.  `status`: the HTTP status; the message is the server's `error`."""

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after_s = retry_after_s  # the server's Retry-After, in seconds, if it sent one


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header in its delay-seconds form (an HTTP date is ignored)."""
    value = (headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None



class V2Client:
    """One v2 server.  Thread-safe: each thread keeps its own keep-alive connection.

    timeout_s: socket timeout of each request (connect, send, and each wait for the answer).
    Every method makes one attempt; retries are the caller's (see `LoadedRemoteModel`).
    """

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout_s
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has carried a request before (it may have gone stale)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._local.conn = cls(self._host, self._port, timeout=self._timeout)
        return self._local.conn, False

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body).  Raises OSError or http.client.HTTPException if the connection fails.

        A kept-alive connection that the server closed while idle is replaced once, silently.
        """
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers={**self._headers, **(headers or {})})
                resp = conn.getresponse()
                data = resp.read()
            except BaseException as e:
                conn.close()
                self._local.conn = None
                if reused and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue  # stale keep-alive connection: one fresh try, not a failure
                raise
            if resp.will_close:
                conn.close()
                self._local.conn = None
            return resp.status, resp.headers, data

    def _json(self, method: str, path: str) -> dict:
        status, headers, data = self.request(method, path)
        if status != 200:
            raise RemoteError(status, _error_text(data), retry_after_s=_retry_after(headers))
        return json.loads(data)

    def ready(self) -> bool:
        try:
            return self.request("GET", "/v2/health/ready")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def server_metadata(self) -> dict:
        """GET /v2: {"name", "version", "extensions": [...]}."""
        return self._json("GET", "/v2")

    def model_metadata(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{urllib.parse.quote(model, safe='')}")

    def model_stats(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{urllib.parse.quote(model, safe='')}/stats")

    def infer_tensors(self, model: str, inputs: Sequence[dict], tail: bytes, outputs: Sequence[str] | None, *,
                      binary: bool = True) -> dict[str, np.ndarray]:
        """One request: input tensors from `protocol.encode_tensor` (their bytes joined in `tail`) ->
        {output name: array} for each of `outputs` (None: every output the server sends), asked in binary
        (binary=True) or as JSON (binary=False: every input must be JSON too, `tail` empty)."""
        header, tail = protocol.encode_request(inputs, tail, outputs, binary=binary)
        kind = {"Content-Type": "application/octet-stream", protocol.HEADER_LENGTH: str(len(header))} if binary \
            else {"Content-Type": "application/json"}
        status, headers, data = self.request(
            "POST", f"/v2/models/{urllib.parse.quote(model, safe='')}/infer", body=header + tail, headers=kind)
        if status != 200:
            raise RemoteError(status, _error_text(data), retry_after_s=_retry_after(headers))
        try:
            return protocol.decode_outputs(data, headers.get(protocol.HEADER_LENGTH), outputs)
        except (protocol.ProtocolError, ValueError, TypeError, KeyError, AttributeError) as e:
            # Not the rows' fault: a server whose replies we cannot read gets no per-row bisection.
            raise ModelUnavailable(f"server {self._host}:{self._port}: its reply is not a v2 response ({e})") from None

    def infer(self, model: str, texts: Sequence[str], *, input_name: str = "text",
              output_name: str = "embedding") -> np.ndarray:
        """One request of a text model: BYTES input `input_name` (binary) -> output `output_name` as an array."""
        tensor, tail = protocol.encode_tensor(input_name, "BYTES", texts, binary=True)
        return self.infer_tensors(model, [tensor], tail, [output_name])[output_name]


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", errors="replace") or "(empty body)"
