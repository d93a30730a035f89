"""`bulkinfer run --server` (the CLI, a real process) against a third-party Open Inference Protocol server:
MLServer 1.7.1 serving a small custom model (tests/serve/v2_model: text BYTES -> n_bytes INT32, stats FP32
[3]).  MLServer has no binary tensor data extension (it answers a binary request with 422), so the client
speaks JSON to it, and its NumpyCodec answers a declared [-1] output as [N, 1].

MLServer lives in its own venv, `.venv-mlserver` (its FastAPI/pandas stack stays out of Beam's), built by
`make test` from requirements-mlserver.txt; without it this module skips, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
MODEL_DIR = Path(__file__).resolve().parent / "v2_model"
sys.path.insert(0, str(MODEL_DIR))
from textstats import features  # noqa: E402 -- the model's own function: numpy only

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MLSERVER.exists(), reason=(
        f"MLServer is not installed in {MLSERVER.parent.parent}; `make test` builds that venv from "
        "requirements-mlserver.txt")),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    """MLServer serving `textstats` on loopback (REST and gRPC on free ports, no metrics server, the model
    in the server's own process); its URL."""
    work = tmp_path_factory.mktemp("mlserver")
    for name in ("textstats.py", "model-settings.json"):
        shutil.copy(MODEL_DIR / name, work / name)
    port = _free_port()
    (work / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": _free_port(), "metrics_endpoint": None,
        "parallel_workers": 0, "debug": False}))
    log = work / "mlserver.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MLSERVER), "start", str(work)], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"MLServer exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/v2/models/textstats/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"MLServer not ready after 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_run_against_mlserver_gives_the_model_outputs_and_bad_rows_are_dead_letters(mlserver, tmp_path):
    texts = [f"row {i}: the quick brown fox jumps " + "over the lazy dog " * (i % 4) for i in range(40)]
    texts[7] = "δέλτα ünïcode, 日本語のテキスト"
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    rows[13]["text"] = ""  # the model refuses it: MLServer's InferenceError, HTTP 400
    rows[29]["text"] = "crash\x00here"  # the model raises on it: HTTP 500, "Internal Server Error"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "textstats", "--server", mlserver,
         "--input", str(tmp_path / "in.jsonl"), "--output", str(out)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert (report["rows_in"], report["rows_out"], report["rows_failed"], report["reconciled"]) == (40, 38, 2, True)
    letters = {json.loads(line)["id"]: json.loads(line) for f in out.glob("failed-*.jsonl")
               for line in f.read_text("utf-8").splitlines()}
    assert sorted(letters) == [13, 29]
    assert letters[13]["stage"] == "inference" and "HTTP 400: row 0: text is empty" in letters[13]["error"]
    assert letters[29]["stage"] == "inference" and "HTTP 500" in letters[29]["error"]
    assert letters[29]["record"] == rows[29]

    table = pq.ParquetDataset(sorted(map(str, out.glob("part-*.parquet")))).read().to_pylist()
    got = {r["id"]: r for r in table}
    good = [i for i in range(40) if i not in (13, 29)]
    assert sorted(got) == good
    n_bytes, stats = features([texts[i] for i in good])  # what the model computes
    np.testing.assert_array_equal([got[i]["n_bytes"] for i in good], n_bytes)  # INT32 [N], from MLServer's [N, 1]
    np.testing.assert_array_equal(np.array([got[i]["stats"] for i in good], np.float32), stats)  # FP32 [N, 3]
