"""The v2 routes of `bulkinfer serve`: one `Handler` per connection parses a request, checks the token,
size and deadlines, and answers health, metadata, stats and infer (see serve/server.py for the routes'
table and the limits).  The model runs in the app's batcher; the handler only parses and encodes.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING

from bulkinfer import __version__
from bulkinfer.errors import is_infrastructure_failure
from bulkinfer.serve import protocol
from bulkinfer.serve.batcher import Closed, Overloaded
from bulkinfer.serve.connections import DeadlineReader, LimitedHTTPServer
from bulkinfer.serve.protocol import HEADER_LENGTH, ProtocolError, show

if TYPE_CHECKING:
    from bulkinfer.serve.server import Server

log = logging.getLogger("bulkinfer.serve.server")  # one logger for the server's lines


class _Reply(Exception):
    """An early answer from a route: status and JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "bulkinfer"
    server: LimitedHTTPServer

    def setup(self):
        self.timeout = self.server.app.config.idle_timeout_s  # socket timeout: idle keep-alive threads end
        super().setup()
        self.rfile.close()  # the stdlib's reader: replaced by one with deadlines (the socket stays open)
        self._reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)

    def finish(self):
        try:
            super().finish()
        finally:
            if self.server.app.batcher is not None:  # this connection sends nothing more: not waited for
                self.server.app.batcher.forget(self)

    def handle_one_request(self):
        # The next request's line and headers must all arrive within idle_timeout_s, however slowly they
        # trickle (the stdlib closes the connection on TimeoutError); the body gets its own deadline.
        self._reader.until = time.monotonic() + self.server.app.config.idle_timeout_s
        super().handle_one_request()

    def log_message(self, format, *args):  # noqa: A002 -- BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.address_string(), format % args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path" without a version: no headers to answer with
            self.send_error(HTTPStatus.BAD_REQUEST, "the request line must end with HTTP/1.0 or HTTP/1.1")
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own rejections (malformed request line or headers, a method we have no do_* for) in
        our JSON form instead of its HTML, always with a status line, and never a 5xx for the client's fault."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {show(self.command)} is not supported; use GET or POST"
        if self.request_version in ("", "HTTP/0.9"):  # the request line did not parse: answer in HTTP/1.1 anyway
            self.request_version = self.protocol_version
        self._body_read = False  # whatever follows is not trusted as the next request
        self._send_error(code, message or self.responses.get(code, ("bad request",))[0])

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        app._enter()
        # A GET body is never read, so it must not be taken for the next request: close after answering.
        self._body_read = (method == "GET" and self.headers.get("Content-Length", "0").strip() == "0"
                           and "Transfer-Encoding" not in self.headers)
        try:
            if app.draining:
                raise _Reply(503, "the server is shutting down; retry on a new connection")
            status, body, headers = self._route(method, app)
            self._send(status, body, headers)
        except _Reply as r:
            self._send_error(r.status, str(r))
        except ProtocolError as e:
            self._send_error(e.status, str(e))
        except Exception as e:  # noqa: BLE001 -- the server must answer and stay up
            log.exception("unexpected error on %s %s", method, self.path)
            self._send_error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            app._leave()

    def _route(self, method: str, app: Server):
        parts = [_unescape(p) for p in self.path.split("?", 1)[0].strip("/").split("/")]
        if parts[:1] != ["v2"]:
            raise _Reply(404, f"no route {show(self.path)}; the Open Inference Protocol routes start with /v2")
        rest = parts[1:]
        if rest in (["health", "live"], ["health", "ready"]):
            self._need(method, "GET")
            live = rest[1] == "live" or app.model is not None
            return (200 if live else 503), {"live": True} if rest[1] == "live" else {"ready": live}, {}
        self._authorize(app)
        if rest == []:
            self._need(method, "GET")
            return 200, {"name": "bulkinfer", "version": __version__, "extensions": ["binary_tensor_data"]}, {}
        if rest[:1] != ["models"] or len(rest) < 2:
            raise _Reply(404, f"no route {show(self.path)}")
        name, tail = rest[1], rest[2:]
        if tail[:1] == ["versions"] and len(tail) >= 2:  # one version per model: any version names it
            tail = tail[2:]
        model = self._model(app, name)
        if tail == []:
            self._need(method, "GET")
            return 200, _metadata(model), {}
        if tail == ["ready"]:
            self._need(method, "GET")
            return 200, {"name": name, "ready": True}, {}
        if tail == ["stats"]:
            self._need(method, "GET")
            s = app.batcher.stats
            return 200, {"model_stats": [{"name": name, "version": "1", "inference_count": s.rows,
                                          "execution_count": s.calls, "request_count": s.requests,
                                          "failed_request_count": s.failed_requests}]}, {}
        if tail == ["infer"]:
            self._need(method, "POST")
            return self._infer(app, model)
        raise _Reply(404, f"no route {show(self.path)}")

    def _need(self, method: str, want: str) -> None:
        if method != want:
            raise _Reply(405, f"{self.path} takes {want}, not {method}")

    def _authorize(self, app: Server) -> None:
        token = app.config.token
        if token is None:
            return
        got = self.headers.get("Authorization", "")
        scheme, _, credentials = got.strip().partition(" ")
        # The scheme name is case-insensitive (RFC 9110 11.1); the token is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            raise _Reply(401, "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'"
                         if got else "this server needs a bearer token; send 'Authorization: Bearer <token>'")

    def _model(self, app: Server, name: str):
        if app.model is None:
            raise _Reply(503, "the model is still loading; retry shortly")
        if name != app.name:
            raise _Reply(404, f"model {show(name)} is not served here; this server serves {app.name!r}")
        return app.model

    def _read_body(self, app: Server) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise _Reply(411, "chunked request bodies are not supported; send a Content-Length")
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            raise _Reply(415, f"Content-Encoding {show(encoding)} is not supported; send the body uncompressed")
        length = self.headers.get("Content-Length")
        if length is None:
            raise _Reply(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise _Reply(400, f"Content-Length must be an integer, got {show(length)}") from None
        limit = app.config.max_request_bytes
        if n > limit:
            raise _Reply(413, f"the request body is {n} bytes; this server takes at most {limit} "
                         "(send fewer rows per request or raise --max-request-bytes)")
        if n < 0:
            raise _Reply(400, f"Content-Length must be >= 0, got {n}")
        self._reader.until = time.monotonic() + app.config.body_timeout_s
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            raise _Reply(408, f"the {n}-byte body did not arrive within {app.config.body_timeout_s:g} s of the "
                         "headers; send it faster or in smaller requests") from None
        if len(body) != n:
            raise _Reply(400, f"the body ended after {len(body)} of {n} bytes")
        self._body_read = True
        return body

    def _infer(self, app: Server, model):
        body = self._read_body(app)
        log.debug("%s: %d-byte infer request read", self.address_string(), len(body))
        request, tail = protocol.split_body(body, self.headers.get(HEADER_LENGTH))
        inputs, n = protocol.decode_inputs(request, tail, model.inputs)
        if n > app.config.max_queue_rows:  # its reply alone may be ~1.5 KB (binary) to 8 KB (JSON) a row
            raise _Reply(413, f"the request has {n} rows; this server takes at most "
                         f"{app.config.max_queue_rows} per request (send fewer rows per request)")
        wanted = _requested_outputs(request, model.outputs)
        settings = getattr(model, "row_settings", None)  # a generator: sampling settings as request parameters
        if settings:
            chosen = {k: v for k, v in (request.get("parameters") or {}).items() if k in settings}
            try:
                model.row_params([chosen], 1)
            except (TypeError, ValueError) as e:
                raise _Reply(400, f"request parameters: {e}") from None
            inputs = {**inputs, "parameters": [chosen] * n}
        if "id" in request and not isinstance(request["id"], str):
            raise ProtocolError(f"'id' must be a string, got {show(request['id'])}")
        if n:
            try:
                future = app.batcher.submit(inputs, source=self)  # self: this connection
            except Overloaded as e:
                raise _Reply(429, str(e)) from None
            except Closed as e:
                raise _Reply(503, str(e)) from None
            try:
                predictions = future.result()  # {output: [n, ...]}
            except Exception as e:  # noqa: BLE001 -- reported to this request only
                if is_infrastructure_failure(e):  # a lost device: not the rows' fault; clients retry, then give up
                    raise _Reply(503, f"the model is unavailable: {type(e).__name__}: {e}") from None
                raise _Reply(500, f"the model failed on this request: {type(e).__name__}: {e}") from None
        else:
            predictions = {s.name: s.empty() for s in model.outputs}
        outputs, tails = [], []
        for spec, binary in wanted:
            if spec.name not in predictions:
                raise _Reply(500, f"the model returned no output {spec.name!r}; it returned {sorted(predictions)}")
            tensor, raw = protocol.encode_tensor(spec.name, spec.v2_datatype, predictions[spec.name], binary=binary)
            outputs.append(tensor)
            tails.append(raw)
        response = {"model_name": app.name, "model_version": "1", "outputs": outputs}
        if "id" in request:
            response["id"] = request["id"]
        if any(binary for _, binary in wanted):
            header = protocol.join(response)
            return 200, header + b"".join(tails), {HEADER_LENGTH: str(len(header)),
                                                   "Content-Type": "application/octet-stream"}
        return 200, response, {}

    def _send(self, status: int, body, headers: dict) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", **headers}
        close = not self._body_read or self.server.app.draining
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if close:  # an unread body would be taken for the next request; end the connection instead
            self.send_header("Connection", "close")
            self.close_connection = True
        if status in (429, 503):
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str) -> None:
        if status >= 500:
            log.warning("%s %s -> %d: %s", self.command, show(getattr(self, "path", "")), status, message)
        self._send(status, {"error": message}, {})


def _unescape(segment: str) -> str:
    """One path segment with its percent-escapes decoded as UTF-8 (%2F stays inside the segment)."""
    if "%" not in segment:
        return segment
    try:
        return urllib.parse.unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise _Reply(400, f"the path segment {show(segment)} is not UTF-8 once percent-decoded") from None


def _metadata(model) -> dict:
    """Every input and output of the model's signature with its v2 datatype and batch shape."""
    return {
        "name": model.name, "versions": ["1"], "platform": "bulkinfer",
        "inputs": [{"name": s.name, "datatype": s.v2_datatype, "shape": s.v2_shape()} for s in model.inputs],
        "outputs": [{"name": s.name, "datatype": s.v2_datatype, "shape": s.v2_shape()} for s in model.outputs],
    }


def describe(model) -> str:
    """'text BYTES [-1] -> embedding FP32 [-1, 384]', for the log."""
    def tensors(specs):
        return ", ".join(f"{s.name} {s.v2_datatype} {s.v2_shape()}" for s in specs)
    return f"{tensors(model.inputs)} -> {tensors(model.outputs)}"


def _requested_outputs(request: dict, specs) -> list:
    """(output spec, binary?) for each output to answer: those the request names in `outputs`, in its
    order, each binary by its own parameters.binary_data; else every output.  The default for either is
    the request's parameters.binary_data_output (JSON if unset)."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be a JSON object")
    binary = bool(params.get("binary_data_output", False))
    outputs = request.get("outputs")
    if outputs is None:
        return [(s, binary) for s in specs]
    by_name = {s.name: s for s in specs}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(f"'outputs' must be a list of objects like {{\"name\": \"{specs[0].name}\"}}")
    wanted, seen = [], set()
    for o in outputs:
        name = o.get("name")
        if not isinstance(name, str) or name not in by_name:
            has = (f"this model has one output, {specs[0].name!r}" if len(specs) == 1
                   else f"this model's outputs are {sorted(by_name)}")
            raise ProtocolError(f"unknown output {show(name)}; {has}")
        if name in seen:
            raise ProtocolError(f"output {name!r} is requested twice")
        seen.add(name)
        wanted.append((by_name[name], bool(protocol.parameters(o, kind="output").get("binary_data", binary))))
    return wanted
