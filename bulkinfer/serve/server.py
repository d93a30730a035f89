"""`bulkinfer serve`: an Open Inference Protocol (KServe v2) REST server for any one model.

    config = ServeConfig(port=8000, token="s3cret")
    serve(model_spec("digits"), config)    # blocks until SIGTERM/SIGINT, then drains

The model is any spec that follows the contract in `bulkinfer.models.signature` (a text embedder, the
`digits` classifier, a `JaxModel`): its declared inputs and outputs are served as v2 tensors, each with
the datatype of its dtype (BYTES for text, FP32, INT32, INT64, ...) and the shape [-1, *per-row shape]
(-1 for the batch axis and a variable axis).  A request sends every input (JSON `data` or binary),
each of shape [N, *per-row shape] (text: [N] or [N, 1]); the answer holds every output, or those the
request names in `outputs`, each as JSON or binary by its own `binary_data` parameter.

Routes (JSON errors are `{"error": "..."}`):
    GET  /v2/health/live, /v2/health/ready         no token needed
    GET  /v2                                       server metadata
    GET  /v2/models/{name}[/versions/{v}]          model metadata: every input and output, datatype and shape
    GET  /v2/models/{name}/ready
    GET  /v2/models/{name}/stats                   requests, rows and model calls so far
    POST /v2/models/{name}/infer                   JSON tensors or the binary tensor data extension

The model runs in one batcher thread (`DynamicBatcher`) that merges concurrent requests; HTTP
threads only parse and encode.  Request bodies are parsed with `json.loads` and `struct`, never
unpickled.

Limits, so that no client can hold the server: the body size is checked against `Content-Length`
before any of it is read (413); at most `max_connections` connections are served at once, and one
more gets a 503 with `Retry-After` (a liveness probe still gets 200) or, in a flood, is closed at once;
a request's line and headers must arrive within `idle_timeout_s` of the connection going idle (else
it is closed), and its body within `body_timeout_s` of its headers (else 408), however slowly the
bytes trickle in.  Model names in paths may be percent-escaped (`/v2/models/my%2Dmodel/infer`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading

from bulkinfer.serve.batcher import DynamicBatcher
from bulkinfer.serve.connections import LimitedHTTPServer
from bulkinfer.serve.routes import Handler, describe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How the server listens and batches.

    host: the address to bind; the loopback default keeps the server off the network.
    port: 0 picks a free port (see `Server.port`).
    token: if set, every route except /v2/health/* needs `Authorization: Bearer <token>`.
    max_queue_delay_ms: how long the batcher waits for more requests to merge into one model call, from
      when the oldest queued request arrived or the previous call ended, whichever is later.
    max_batch_rows: rows per model call, at most (a larger request runs alone).
    max_queue_rows: rows waiting for the model before new requests get 429; a request with more rows gets 413.
    max_request_bytes: larger request bodies get 413, unread.
    drain_timeout_s: on shutdown, how long to wait for requests in flight.
    idle_timeout_s: a connection whose next request's line and headers have not all arrived this long
      after its last answer (or after it opened) is closed.
    body_timeout_s: a request whose body has not all arrived this long after its headers gets 408.
    max_connections: connections served at once (each holds a thread, also while idle between
      requests); one more gets 503 with Retry-After.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_queue_delay_ms: float = 5.0
    max_batch_rows: int = 1024
    max_queue_rows: int = 65536
    max_request_bytes: int = 64 << 20
    drain_timeout_s: float = 30.0
    idle_timeout_s: float = 120.0
    body_timeout_s: float = 60.0
    max_connections: int = 512

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_batch_rows < 1 or self.max_queue_rows < 1:
            raise ValueError("max_batch_rows and max_queue_rows must be >= 1")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.idle_timeout_s <= 0 or self.body_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("idle_timeout_s and body_timeout_s must be > 0 and drain_timeout_s >= 0")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty; leave it unset to serve without authentication")


class Server:
    """A running server: HTTP threads plus one batcher thread.  `set_model` makes it ready."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._http = LimitedHTTPServer((config.host, config.port), Handler, max_connections=config.max_connections)
        self._http.app = self
        self.model = None  # a loaded model (`bulkinfer.models.signature`): inputs, outputs, predict
        self.name: str | None = None
        self.batcher: DynamicBatcher | None = None
        self.draining = False
        self._in_flight = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._http.serve_forever, name="bulkinfer-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    @property
    def connections(self) -> int:
        """Connections being served now (at most config.max_connections), idle keep-alive ones included."""
        return self._http.connections

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._in_flight

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def set_model(self, loaded) -> None:
        """Serves `loaded`, a loaded model with name, inputs, outputs and predict (`bulkinfer.models.signature`).

        Raises TypeError for an object that lacks any of them."""
        missing = [a for a in ("name", "inputs", "outputs", "predict") if not hasattr(loaded, a)]
        if missing:
            raise TypeError(f"{type(loaded).__name__} is not a loaded model: it has no {', '.join(missing)}; "
                            "the server needs the contract in bulkinfer.models.signature")
        self.batcher = DynamicBatcher(
            loaded.predict, max_batch_rows=self.config.max_batch_rows,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1000, max_queue_rows=self.config.max_queue_rows)
        self.name = loaded.name
        self.model = loaded

    def stop(self) -> None:
        """Stops accepting connections, finishes the requests in flight (up to drain_timeout_s), closes."""
        self.draining = True
        self._http.shutdown()  # the accept loop ends; open connections keep their threads
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, self.config.drain_timeout_s):
                log.warning("%d requests still in flight after %.0f s; closing anyway",
                            self._in_flight, self.config.drain_timeout_s)
        if self.batcher is not None:
            self.batcher.close(self.config.drain_timeout_s)
        self._http.server_close()

    def _enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()


def start(loaded, config: ServeConfig) -> Server:
    """A ready server for an already loaded model, listening in background threads (for tests and benchmarks)."""
    server = Server(config)
    try:
        server.set_model(loaded)
    except TypeError:
        server.stop()
        raise
    return server


def serve(model, config: ServeConfig) -> int:
    """Binds, loads `model` (answering 503 on /ready until loaded), serves until SIGTERM or SIGINT, drains.

    Returns the process exit status (0).
    """
    server = Server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("listening on %s; loading %s", server.url, getattr(model, "name", model))
    loaded = model.load()
    server.set_model(loaded)
    log.info("serving model %r (%s) on %s; loaded in %.1f s%s", loaded.name, describe(loaded), server.url,
             loaded.load_s, "; a bearer token is required" if config.token else "")
    while not stop.wait(0.5):
        pass
    log.info("shutting down: finishing requests in flight (%d now)", server.in_flight)
    server.stop()
    stats = server.batcher.stats
    log.info("stopped after %d requests, %d rows, %d model calls", stats.requests, stats.rows, stats.calls)
    return 0
