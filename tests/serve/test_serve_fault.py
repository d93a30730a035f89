"""End to end, in processes: a remote `bulkinfer run` survives a SIGKILLed and restarted server with every
row exactly once; a server down past the retry budget stops the job (exit 1, no row committed as failed)
and the rerun finishes it; SIGTERM lets the request in flight finish and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bulkinfer.models.text import TextEmbedder
from bulkinfer.serve import V2Client
from bulkinfer.testing import synthetic_texts

pytestmark = pytest.mark.slow

ROWS = 2000


@pytest.fixture(scope="module")
def embedder32():
    """The local model the servers here run (`--max-length 32`), to compare their embeddings with."""
    return TextEmbedder.from_name("minilm", max_length=32).load()


def _session_cache() -> str:
    """The test session's persistent XLA cache (tests/conftest.py): a server started here compiles only the
    shapes no earlier process of the session compiled."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def _stats(client: V2Client) -> dict:
    return client.model_stats("minilm")["model_stats"][0]


def test_remote_run_survives_a_server_kill_with_every_row_exactly_once(tmp_path, server_process, embedder32):
    srv = server_process("--max-length", "32", "--compilation-cache", _session_cache())  # the restarted
    # server reuses the first one's compiled shapes (and those of earlier tests in this session)
    data = tmp_path / "in.jsonl"
    texts = synthetic_texts(ROWS)
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    job_log = tmp_path / "job.log"
    with open(job_log, "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--server", srv.url,
             "--input", str(data), "--output", str(out), "--format", "jsonl"],
            env=env, stdout=subprocess.PIPE, stderr=log)
    try:
        client = V2Client(srv.url, timeout_s=5)
        deadline = time.monotonic() + 60
        while _stats(client)["inference_count"] == 0:  # kill once some rows are answered, not all
            assert job.poll() is None, job_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the job sent nothing to the server within 60 s"
            time.sleep(0.05)
        served_before_kill = _stats(client)["inference_count"]
        srv.kill()
        assert served_before_kill < ROWS, "the server answered every row before the kill; the test proved nothing"
        assert job.poll() is None, "the job ended before the server was killed"
        srv.start()
        stdout, _ = job.communicate(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
    log_text = job_log.read_text()
    assert job.returncode == 0, log_text[-3000:]
    assert "retry" in log_text and "failed" in log_text  # the client did see the server go away
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary == {**summary, "rows_in": ROWS, "rows_out": ROWS, "rows_failed": 0}
    rows = [json.loads(line) for f in sorted(out.glob("part-*.jsonl")) for line in f.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == ROWS and sorted(ids) == list(range(ROWS))  # every row, none twice
    got = np.array([r["embedding"] for r in rows], np.float32)  # [ROWS, 384], in the output's order
    np.testing.assert_allclose(got, embedder32.embed([texts[i] for i in ids]), atol=1e-6)  # each row its own
    assert not [f for f in out.glob("failed-*.jsonl") if f.read_text().strip()]
    report = json.loads((out / "report.json").read_text())
    assert report["reconciled"] and report["rows_in"] == report["rows_out"] == ROWS
    assert _stats(V2Client(srv.url))["inference_count"] > 0  # the restarted server did part of the work


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server_process, embedder32):
    srv = server_process("--max-length", "32", "-v")
    client = V2Client(srv.url, timeout_s=60)
    # In flight when SIGTERM comes (the server logs it before computing; a fresh one compiles for seconds),
    # and short enough to finish within the server's 30 s drain timeout on a loaded machine.
    texts = synthetic_texts(400, seed=1)
    result: dict = {}

    def call():
        try:
            result["emb"] = client.infer("minilm", texts)
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 60
    while "infer request read" not in srv.log.read_text():  # the server logs it (-v) before computing
        assert t.is_alive() and time.monotonic() < deadline, result.get("error", "no request within 60 s")
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert "error" not in result, result.get("error")
    np.testing.assert_allclose(result["emb"], embedder32.embed(texts), atol=1e-6)
    assert srv.proc.wait(30) == 0
    log_text = srv.log.read_text()
    assert "finishing requests in flight (1 now)" in log_text  # SIGTERM came while it ran
    assert "closing anyway" not in log_text
    assert not client.ready()  # nothing listens any more


def test_server_down_past_the_retry_budget_fails_the_job_and_a_rerun_finishes(tmp_path, server_process,
                                                                              embedder32):
    """An outage is not the rows' fault: exit 1, nothing committed as failed; once the server is back the
    same command does the rest, every id once, embeddings as a local `predict`."""
    srv = server_process("--max-length", "32", "--compilation-cache", _session_cache())
    texts = synthetic_texts(600, seed=4)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--server", srv.url,
           "--server-retry-budget-s", "1", "--input", str(data), "--output", str(out), "--format", "jsonl",
           "--unit-size", "4KiB", "--wave-units", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not list(out.glob("_committed/*.json")) and job.poll() is None:  # one unit done, then the outage
            time.sleep(0.02)
        srv.kill()
        _, stderr = job.communicate(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
    plan = json.loads((out / "_plan.json").read_text())
    committed = [json.loads(f.read_text()) for f in out.glob("_committed/*.json")]
    assert job.returncode == 1, stderr[-3000:]
    assert "ModelUnavailable" in stderr and "rerun the same command" in stderr
    assert 1 <= len(committed) < len(plan), "the outage must land mid-run for this test to mean anything"
    assert not list(out.glob("failed-*")) and all(r["rows_failed"] == 0 for r in committed)

    srv.start()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"]) == (600, 600, 0)
    assert report["units_skipped"] == len(committed) and report["units_resumed"] == len(plan) - len(committed)
    rows = [json.loads(line) for f in out.glob("part-*.jsonl") for line in f.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == list(range(600)) and not list(out.glob("failed-*"))
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], np.float32),
                               embedder32.embed([texts[i] for i in ids]), atol=1e-6)
