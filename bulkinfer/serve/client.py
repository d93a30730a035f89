"""A small Open Inference Protocol (v2 REST) client, and `RemoteModel`: a model that lives on a server.

    model = RemoteModel(url="http://127.0.0.1:8000", name="minilm")
    loaded = model.load()                             # reads the model's metadata from the server
    loaded.embed(["a sentence", "another"]).shape     # (2, 384)

    p | bulkinfer.BulkInference(model)                # or BulkInference(TextEmbedder..., server=URL)

`RemoteModel` follows the same contract as `TextEmbedder` (`load()`, then `predict`, `input_type`,
`output_name`, `name`, `load_s`), so `BulkInference` runs it like a local model.  `predict` cuts its
rows into chunks of `chunk_rows` and keeps up to `max_in_flight` requests in flight per process.
Each request is retried with jittered exponential backoff on connection errors, timeouts, 429 and
5xx, within a retry budget of `retry.budget_s` seconds; past the budget `predict` raises
`ModelUnavailable`, which fails BulkInference's bundle (an outage is not the rows' fault; the runner
retries the bundle, and a job exits non-zero without committing those rows).
A request the server rejects as malformed (400, 413) raises `RemoteError`, which BulkInference
bisects to isolate the rows at fault.  Works with any v2 server that takes a BYTES input (Triton,
MLServer, KServe runtimes, `bulkinfer serve`); uses the binary tensor data extension both ways.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bulkinfer.errors import ModelUnavailable
from bulkinfer.models.signature import TEXT, TensorSpec
from bulkinfer.serve import protocol

log = logging.getLogger(__name__)

# Statuses worth retrying: the server is overloaded, restarting or behind a proxy that lost it.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Statuses that no retry or bisection can fix: the whole call fails at once.
FATAL_STATUSES = frozenset({401, 403, 404, 405})


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long and how often to retry one request.

    budget_s: total seconds one request may spend retrying before its rows are given up.
    base_s, max_backoff_s: the backoff before retry k is about base_s * 2**k, capped at max_backoff_s,
      with the lower half jittered so that many clients do not retry in lockstep.
    attempts_on_500: tries on HTTP 500, which usually means the rows broke the model (not retried long).
    """

    budget_s: float = 120.0
    base_s: float = 0.1
    max_backoff_s: float = 5.0
    attempts_on_500: int = 2

    def __post_init__(self):
        if self.budget_s < 0 or self.base_s <= 0 or self.max_backoff_s < self.base_s or self.attempts_on_500 < 1:
            raise ValueError("need budget_s >= 0, 0 < base_s <= max_backoff_s and attempts_on_500 >= 1")

    def backoff(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """Seconds before retry `attempt`: jittered exponential, but never sooner than the server asked."""
        cap = min(self.max_backoff_s, self.base_s * 2 ** min(attempt, 30))
        return max(cap / 2 + rng.uniform(0, cap / 2), retry_after_s or 0.0)


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

    def model_metadata(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{urllib.parse.quote(model, safe='')}")

    def model_stats(self, model: str) -> dict:
        return self._json("GET", f"/v2/models/{urllib.parse.quote(model, safe='')}/stats")

    def infer(self, model: str, texts: Sequence[str], *, input_name: str = "text",
              output_name: str = "embedding") -> np.ndarray:
        """One request: BYTES input `input_name` (binary) -> output `output_name` as a numpy array."""
        header, tail = protocol.encode_infer_request(input_name, texts, output=output_name)
        status, headers, data = self.request(
            "POST", f"/v2/models/{urllib.parse.quote(model, safe='')}/infer", body=header + tail,
            headers={"Content-Type": "application/octet-stream", protocol.HEADER_LENGTH: str(len(header))})
        if status != 200:
            raise RemoteError(status, _error_text(data), retry_after_s=_retry_after(headers))
        try:
            return protocol.decode_output(data, headers.get(protocol.HEADER_LENGTH), output_name)
        except (protocol.ProtocolError, ValueError, TypeError, KeyError, AttributeError) as e:
            # Not the rows' fault: a server whose replies we cannot read gets no per-row bisection.
            raise ModelUnavailable(f"server {self._host}:{self._port}: its reply is not a v2 response ({e})") from None


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", errors="replace") or "(empty body)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoteModel:
    """What to call: a model on a v2 server.  Picklable; `load()` connects.

    url: the server, e.g. http://127.0.0.1:8000.   name: the model's name on the server.
    token: a bearer token, if the server needs one (kept out of repr).
    input_name, output_name: the model's BYTES input and numeric output.
    chunk_rows: rows per request.   max_in_flight: concurrent requests per process.
    timeout_s: socket timeout per request.   retry: see `RetryPolicy`.
    """

    url: str
    name: str
    token: str | None = dataclasses.field(default=None, repr=False)
    input_name: str = "text"
    output_name: str = "embedding"
    chunk_rows: int = 256
    max_in_flight: int = 4
    timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self):
        V2Client(self.url)  # checks the URL's form now, not on a worker
        if self.chunk_rows < 1 or self.max_in_flight < 1 or self.timeout_s <= 0:
            raise ValueError("chunk_rows and max_in_flight must be >= 1 and timeout_s > 0")

    @classmethod
    def for_model(cls, url: str, model, **settings) -> RemoteModel:
        """The remote twin of a local model spec (or of a `--model` value: a built-in name or a directory)."""
        if not isinstance(model, str):
            return cls(url=url, name=model.name, **settings)
        return cls(url=url, name=model_name(model), **settings)

    def load(self) -> LoadedRemoteModel:
        return LoadedRemoteModel(self)


def model_name(name_or_path: str) -> str:
    """The name a server gives the model of a `--model` value: the built-in name, or the directory's name."""
    from pathlib import Path

    from bulkinfer.models.registry import BUILTIN_MODELS

    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    return Path(name_or_path).expanduser().resolve().name


class LoadedRemoteModel:
    """A connected `RemoteModel`, following the model contract (`bulkinfer.models.signature`):
    `predict({input_name: texts}) -> {output_name: [N, dim]}`.  Thread-safe; shared by a process's DoFn threads."""

    def __init__(self, spec: RemoteModel, *, sleep=time.sleep, clock=time.monotonic):
        t0 = time.perf_counter()
        self.spec = spec
        self.name = spec.name
        self.output_name = spec.output_name
        self.client = V2Client(spec.url, token=spec.token, timeout_s=spec.timeout_s)
        self._sleep, self._clock = sleep, clock
        self._rng = random.Random()
        meta = self._with_retries(lambda: self.client.model_metadata(spec.name), threading.Event(), "metadata")
        self.dim = _check_metadata(meta, spec)
        self._pool = ThreadPoolExecutor(spec.max_in_flight, thread_name_prefix="bulkinfer-remote")
        self.load_s = time.perf_counter() - t0

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.spec.input_name, (), TEXT),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(self.spec.output_name, (self.dim,), "float32"),)

    def predict(self, inputs, stats=None) -> dict[str, np.ndarray]:
        """The model contract: {input_name: N texts} -> {output_name: [N, dim]}; see `embed`."""
        return {self.spec.output_name: self.embed(inputs[self.spec.input_name], stats=stats)}

    def embed(self, texts: Sequence[str], stats=None) -> np.ndarray:
        """[N, dim] outputs in input order.  Raises ModelUnavailable past the retry budget, RemoteError on a 4xx."""
        t0 = time.perf_counter()
        n, size = len(texts), self.spec.chunk_rows
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        chunks = [texts[i : i + size] for i in range(0, n, size)]
        give_up = threading.Event()  # set when one chunk fails: the others stop retrying

        def one(chunk):
            try:
                return self._with_retries(
                    lambda: self.client.infer(self.name, chunk, input_name=self.spec.input_name,
                                              output_name=self.spec.output_name), give_up, "infer")
            except BaseException:
                give_up.set()
                raise

        if len(chunks) == 1:
            parts = [one(chunks[0])]
        else:
            futures = [self._pool.submit(one, c) for c in chunks]
            errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None and not isinstance(e, _GaveUp)), None)
            if first is not None:
                raise first
            parts = [f.result() for f in futures]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]  # [N, dim]
        if out.shape[0] != n:
            raise RemoteError(200, f"the server returned {out.shape[0]} rows for {n} inputs")
        if stats is not None:
            stats.rows += n
            stats.batches += len(chunks)
            stats.run_s += time.perf_counter() - t0
        return out

    def _with_retries(self, call, give_up: threading.Event, what: str):
        policy, start, attempt, failures_500 = self.spec.retry, self._clock(), 0, 0
        while True:
            if give_up.is_set():
                raise _GaveUp("another request of the same call gave up")
            try:
                return call()
            except RemoteError as e:
                if e.status in FATAL_STATUSES:
                    raise ModelUnavailable(f"server {self.spec.url}, model {self.name!r}: {e}") from None
                if e.status == 500:
                    failures_500 += 1
                    if failures_500 >= policy.attempts_on_500:
                        raise
                elif e.status not in RETRY_STATUSES and e.status < 500:
                    raise  # 400, 413, ...: the rows or their size; bisection can isolate them
                reason, retry_after = str(e), e.retry_after_s
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
                reason, retry_after = f"{type(e).__name__}: {e}", None
            attempt += 1
            delay = policy.backoff(attempt, self._rng, retry_after)
            elapsed = self._clock() - start
            if elapsed + delay > policy.budget_s:
                raise ModelUnavailable(
                    f"server {self.spec.url}, model {self.name!r}: {what} failed {attempt} times in {elapsed:.1f} s "
                    f"(retry budget {policy.budget_s:g} s); last error: {reason}") from None
            log.warning("server %s: %s failed (%s); retry %d in %.2f s", self.spec.url, what, reason, attempt, delay)
            self._sleep(delay)


class _GaveUp(ModelUnavailable):
    """A chunk abandoned because another chunk of the same call already failed."""


def _check_metadata(meta: dict, spec: RemoteModel) -> int:
    """The output's last dimension; loud errors if the model does not take a BYTES `input_name`."""
    inputs = {t.get("name"): t for t in meta.get("inputs", [])}
    outputs = {t.get("name"): t for t in meta.get("outputs", [])}
    if spec.input_name not in inputs:
        raise ValueError(f"model {spec.name!r} on {spec.url} has no input {spec.input_name!r}; its inputs are "
                         f"{sorted(inputs)}; set input_name")
    if inputs[spec.input_name].get("datatype") != "BYTES":
        raise ValueError(f"model {spec.name!r} input {spec.input_name!r} is {inputs[spec.input_name].get('datatype')}, "
                         "not BYTES; RemoteModel sends text")
    if spec.output_name not in outputs:
        raise ValueError(f"model {spec.name!r} on {spec.url} has no output {spec.output_name!r}; its outputs are "
                         f"{sorted(outputs)}; set output_name")
    shape = outputs[spec.output_name].get("shape") or [-1]
    return int(shape[-1])
