"""Remote mode vs local mode on one machine, in one run: prints a markdown table of rows/s and ratios.

    JAX_PLATFORMS=cpu .venv/bin/python bench/remote.py --rows 4000

Measures, on the same synthetic corpus (`bulkinfer.testing.synthetic_texts`):
  1. the local engine in memory (`TextEmbedder.load().predict`), the reference;
  2. `bulkinfer serve` throughput with 1, 4 and 16 concurrent clients, each sending `--request-rows` rows
     per request (binary tensors, keep-alive), so dynamic batching has something to merge;
  3. the whole job: `bulkinfer run` (local) vs `bulkinfer run --server` (remote), from each job's report.
Measurements are repeated in interleaved rounds and the best is reported, because a shared machine's
background load swings more than the differences measured; beside each best round stand the 1-minute
load average at its end and the cores its processes used (CPU-s / wall: this process for the local
engine; the server process plus this process's client threads for the server rows; the job process for
the jobs).  Server rows also give the rows per merged model call (from the server's /stats).  Every
shape is compiled before timing (one warm-up shared through a persistent compilation cache), so the
numbers are steady state.  The server and the clients share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("bench.remote")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="corpus size (default 4000)")
    parser.add_argument("--request-rows", type=int, default=64, help="rows per client request (default 64)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the in-memory measurements")
    parser.add_argument("--job-repeats", type=int, default=2, help="rounds that also run both jobs (default 2)")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--cache", default=".bench/xla-cache",
                        help="persistent XLA compilation cache; a warm one saves ~100 s of compiles (default .bench/xla-cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        rows = run(args, Path(tmp))
    sys.stdout.write(table(rows, args) + "\n")
    sys.stdout.write(f"\nLoad average (1 min) before and after: {load_before:.2f}, {os.getloadavg()[0]:.2f}.\n")
    return 0


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Sample(tuple):
    """One measurement: (rows/s, 1-minute load average at its end, cores used, rows per model call or None)."""


def run(args, tmp: Path) -> list[tuple[str, list[Sample]]]:
    """Each measurement `--repeats` times, interleaved round by round, so background load hits all alike."""
    from bulkinfer.models.text import TextEmbedder
    from bulkinfer.serve import V2Client
    from bulkinfer.testing import synthetic_texts

    texts = synthetic_texts(args.rows, seed=0)
    cache = str(Path(args.cache).resolve())
    clients = [int(c) for c in args.clients.split(",")]
    names = ["local engine, in memory (`TextEmbedder.predict`)"] + [
        f"server, {n} concurrent client{'s' if n > 1 else ''} x {args.request_rows} rows/request" for n in clients]
    names += ["job: `bulkinfer run` (local)", "job: `bulkinfer run --server` (remote)"]
    results: dict[str, list[Sample]] = {name: [] for name in names}

    log.info("local engine: loading and compiling every shape")
    local = TextEmbedder.from_name("minilm", warmup=True, compilation_cache_dir=cache).load()
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    data = tmp / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    server = subprocess.Popen(
        [sys.executable, "-m", "bulkinfer.cli", "serve", "--model", "minilm", "--port", str(args.port),
         "--warmup", "--compilation-cache", cache], env=env, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, server)
        client = V2Client(url, timeout_s=300)
        for r in range(args.repeats):
            log.info("round %d of %d", r + 1, args.repeats)
            t0, c0 = time.perf_counter(), time.process_time()
            local.predict({"text": texts})
            wall = time.perf_counter() - t0
            results[names[0]].append(Sample((args.rows / wall, os.getloadavg()[0], (time.process_time() - c0) / wall,
                                             None)))
            for name, n in zip(names[1:], clients):
                results[name].append(_clients(client, texts, n, args.request_rows, server.pid))
            if r < args.job_repeats:
                results[names[-2]].append(_job(["--compilation-cache", cache], data, tmp / f"out-local-{r}", env))
                results[names[-1]].append(_job(["--server", url], data, tmp / f"out-remote-{r}", env))
    finally:
        server.terminate()
        server.wait(60)
    return list(results.items())


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def _clients(client, texts: list[str], n: int, request_rows: int, server_pid: int) -> Sample:
    """rows/s of n threads that each send their share of the corpus in requests of request_rows rows."""
    requests = [texts[i : i + request_rows] for i in range(0, len(texts), request_rows)]
    shares = [requests[k::n] for k in range(n)]
    errors: list[BaseException] = []

    def worker(share):
        try:
            for req in share:
                client.infer("minilm", req)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in shares]
    calls0 = client.model_stats("minilm")["model_stats"][0]["execution_count"]
    t0, c0, s0 = time.perf_counter(), time.process_time(), _cpu_s(server_pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cores = (time.process_time() - c0 + _cpu_s(server_pid) - s0) / elapsed
    if errors:
        raise errors[0]
    calls = client.model_stats("minilm")["model_stats"][0]["execution_count"] - calls0
    log.info("%d clients: %.1f rows/s, %d model calls", n, len(texts) / elapsed, calls)
    return Sample((len(texts) / elapsed, os.getloadavg()[0], cores, len(texts) / calls))


def _job(extra: list[str], data: Path, out: Path, env: dict) -> Sample:
    cmd = [sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--input", str(data),
           "--output", str(out), *extra]
    log.info("job: %s", " ".join(cmd[2:]))
    t0, c0 = time.perf_counter(), _children_cpu_s()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cores = (_children_cpu_s() - c0) / (time.perf_counter() - t0)
    report = json.loads((out / "report.json").read_text())
    if not report["reconciled"] or report["rows_failed"]:
        raise RuntimeError(f"the job lost or failed rows: {report}")
    return Sample((report["rows_per_s"], os.getloadavg()[0], cores, None))


def table(rows: list[tuple[str, list[Sample]]], args) -> str:
    ref = max(rows[0][1])[0]
    lines = [
        f"Remote vs local, MiniLM, {args.rows} synthetic texts (`bulkinfer.testing.synthetic_texts`, seed 0); "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, JAX_PLATFORMS=cpu; {time.strftime('%Y-%m-%d')}.",
        f"Command: `JAX_PLATFORMS=cpu .venv/bin/python bench/remote.py --rows {args.rows} --request-rows "
        f"{args.request_rows} --clients {args.clients} --repeats {args.repeats} --job-repeats {args.job_repeats}`. "
        "Best of the interleaved repeats, with the range; ratios are best / best local engine.",
        "",
        "| what | rows/s (best) | range | x local engine | rows per model call | load (1 min) | cores (CPU-s / wall) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, samples in rows:
        if not samples:
            continue
        rate, load, cores, per_call = max(samples)
        low = min(s[0] for s in samples)
        lines.append(f"| {name} | {rate:.1f} | {low:.0f}-{rate:.0f} | {rate / ref:.2f} | "
                     f"{'' if per_call is None else f'{per_call:.0f}'} | {load:.2f} | {cores:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
