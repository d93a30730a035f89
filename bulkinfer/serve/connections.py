"""HTTP connections that no client can hold: at most `max_connections` served at once (one more gets a
503 with Retry-After, a liveness probe still 200; in a flood, new ones are closed at once), and reads
that end by a deadline however slowly the bytes trickle in.

    httpd = LimitedHTTPServer((host, port), Handler, max_connections=512)
    stream = DeadlineReader(sock, idle_s=30); stream.until = time.monotonic() + 60   # the body's deadline
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)


# A connection over max_connections: how long it may take to send its request head before its 503, and
# how long (and how many bytes) of what it sends after are read and dropped, so that closing does not
# reset the connection before the client has read the answer.  Rejections run at most this many at once;
# past that, connections are closed at once.
REJECT_TIMEOUT_S = 2.0
REJECT_DRAIN_BYTES = 1 << 20
MAX_REJECTING = 32


class LimitedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep the process alive
    allow_reuse_address = True  # a restarted server can bind the same port at once
    app: object  # the serve.server.Server this serves

    def __init__(self, address, handler, *, max_connections: int):
        # The listen backlog: socketserver's default of 5 overflows when a few dozen clients connect at
        # once (16 bench clients did); the kernel then drops or SYN-cookies the rest, which stalls a client
        # for a second per retransmitted SYN or resets its connection.
        self.request_queue_size = socket.SOMAXCONN
        self.max_connections = max_connections
        self.connections = 0  # being served, each by its thread
        self._lock = threading.Lock()
        self._rejecting = threading.BoundedSemaphore(MAX_REJECTING)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """Called by the accept loop for each new connection: serve it, answer 503, or close it."""
        with self._lock:
            serve = self.connections < self.max_connections
            self.connections += serve
        if serve:
            try:
                super().process_request(request, client_address)  # a thread running process_request_thread
            except BaseException:
                self._done()
                raise
        elif self._rejecting.acquire(blocking=False):
            threading.Thread(target=self._reject, args=(request,), name="bulkinfer-reject", daemon=True).start()
        else:
            log.warning("over %d connections and %d rejections at once; closing a new one unanswered",
                        self.max_connections, MAX_REJECTING)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)  # serves, then closes the connection
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self.connections -= 1

    def _reject(self, sock: socket.socket) -> None:
        """Answers one connection over the limit with 503 and Retry-After (200 to a liveness probe), closes it."""
        try:
            deadline = time.monotonic() + REJECT_TIMEOUT_S
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
            if head.startswith((b"GET /v2/health/live ", b"GET /v2/health/live?")):
                status, body = "200 OK", {"live": True}
            else:
                status, body = "503 Service Unavailable", {"error": (
                    f"the server is serving its maximum of {self.max_connections} connections; retry later on a "
                    "new connection (or raise --max-connections)")}
            data = json.dumps(body).encode()
            sock.settimeout(REJECT_TIMEOUT_S)
            sock.sendall(f"HTTP/1.1 {status}\r\nServer: bulkinfer\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n".encode()
                         + data)
            sock.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + REJECT_TIMEOUT_S, 0
            while drained < REJECT_DRAIN_BYTES and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:  # reset, timed out: the client is gone or too slow; nothing more to do
            pass
        finally:
            self.shutdown_request(sock)
            self._rejecting.release()


class DeadlineReader(io.RawIOBase):
    """A connection's socket as a raw stream whose reads all end by `until` (time.monotonic() seconds).

    A socket timeout bounds one wait; this bounds a whole request head or body however slowly it
    trickles.  Each read waits at most `idle_s` and at most until `until`; past it, TimeoutError.
    """

    def __init__(self, sock: socket.socket, idle_s: float):
        self._sock, self._idle_s = sock, idle_s
        self.until: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self._idle_s if self.until is None else min(self._idle_s, self.until - time.monotonic())
        if wait <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(wait)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._idle_s)  # writes keep the idle timeout
