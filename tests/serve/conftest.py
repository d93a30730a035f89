"""Fixtures for the remote-mode tests: the real MiniLM, served in-process or as a `bulkinfer serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bulkinfer.models.text import TextEmbedder
from bulkinfer.serve import ServeConfig, start


@pytest.fixture(scope="session")
def embedder():
    """MiniLM loaded once for the whole session; the in-process servers share it."""
    return TextEmbedder.from_name("minilm").load()


@pytest.fixture(scope="module")
def server(embedder):
    """An in-process server on a free port with the default settings."""
    srv = start(embedder, ServeConfig(port=0))
    yield srv
    srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return _free_port()


class ServerProcess:
    """`bulkinfer serve --model MODEL` (minilm by default) in its own process; `start()` can be called again
    after a kill."""

    def __init__(self, port: int, args: list[str], log_dir, model: str = "minilm"):
        self.port, self.args, self.log_dir, self.model = port, args, log_dir, model
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.starts += 1
        self.log = self.log_dir / f"server-{self.port}-{self.starts}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bulkinfer.cli", "serve", "--model", self.model, "--port", str(self.port),
                 *self.args], env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _process_factory(port: int, log_dir):
    started: list[ServerProcess] = []

    def make(*args: str, model: str = "minilm") -> ServerProcess:
        sp = ServerProcess(port, list(args), log_dir, model)
        started.append(sp)
        return sp.start()

    return make, started


@pytest.fixture
def server_process(tmp_path, free_port):
    """A factory: server_process(*serve_args, model="minilm") -> a started ServerProcess on a free port; killed
    at teardown."""
    make, started = _process_factory(free_port, tmp_path)
    yield make
    for sp in started:
        sp.kill()


@pytest.fixture(scope="module")
def module_server_process(tmp_path_factory):
    """Like `server_process`, but the processes live until the test module ends (one server for many tests)."""
    make, started = _process_factory(_free_port(), tmp_path_factory.mktemp("server"))
    yield make
    for sp in started:
        sp.kill()
