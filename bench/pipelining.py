"""Batches in flight: does running several at once pay?  MiniLM's engine at max_in_flight 0 (one batch at
a time), 1, 2 (the default) and 4, side by side in one process, on the real-text corpus.

    JAX_PLATFORMS=cpu .venv-bench/bin/python bench/pipelining.py [--rows 3000] [--repeats 3]

First, two packed batches dispatched from one thread vs from two threads (the wall time until both are
done, best of --repeats): XLA:CPU runs one thread's batches one after another although each call returns
at once, and batches from different threads at the same time, which is why the engine gives each batch
in flight a dispatch thread of its own.  Then `Engine.run` over --rows texts (pre-tokenized) at each
setting, interleaved round by round so that a change of machine load hits them alike; each keeps its
best round.  Prints one JSON object: per setting rows/s, this process's cores (CPU seconds / wall
seconds over that round) and the device-busy fraction (busy_s / run_s), and rows/s over max_in_flight 0;
with the 1-minute load average.  Every engine loads its shapes from --cache (compiled on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from bench import corpus  # noqa: E402
from bulkinfer.models.text import TextEmbedder  # noqa: E402
from bulkinfer.runtime import EngineStats  # noqa: E402
from bulkinfer.runtime import inputs as engine_inputs  # noqa: E402

SETTINGS = (0, 1, 2, 4)


def pair_seconds(engine, seqs, repeats: int) -> dict:
    """Wall seconds until two packed batches are done, dispatched from one thread and from two."""
    arrays, lengths = engine_inputs.check(engine._inputs, {"input_ids": seqs}, engine.bucketing.lengths[-1])
    plan = engine.bucketing.pack(lengths)[:2]
    calls = []
    for batch, length, tokens, idx in plan:
        exe = engine._executable(batch, length, tokens)
        args = engine_inputs.pack(engine._inputs, arrays, idx, lengths[idx], batch, length, tokens)
        calls.append((exe, args))

    def one_thread():
        jax.block_until_ready([exe(engine._params, a) for exe, a in calls])

    def two_threads():
        threads = [threading.Thread(target=lambda c=c: c[0](engine._params, c[1]).block_until_ready()) for c in calls]
        [t.start() for t in threads]
        [t.join() for t in threads]

    best = {"one_thread_ms": float("inf"), "two_threads_ms": float("inf")}
    one_thread()
    for _ in range(repeats):
        for key, f in (("one_thread_ms", one_thread), ("two_threads_ms", two_threads)):
            t0 = time.perf_counter()
            f()
            best[key] = min(best[key], round(1e3 * (time.perf_counter() - t0), 1))
    return {"shapes": [list(p[:3]) for p in plan], **best}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=".bench/cache/xla", help="compilation cache (default: make bench's)")
    args = parser.parse_args(argv)
    texts = corpus.real_texts()[0][: args.rows]
    loaded = {m: TextEmbedder.from_name("minilm", max_in_flight=m, compilation_cache_dir=os.path.abspath(args.cache),
                                        packed=True).load() for m in SETTINGS}
    seqs = loaded[0].tokenize(texts)
    for m in SETTINGS:
        loaded[m].engine.run({"input_ids": seqs})  # every shape this corpus uses: loaded or compiled
    out = {"rows": len(seqs), "load_1min": os.getloadavg()[0], "affinity": len(os.sched_getaffinity(0)),
           "pair": pair_seconds(loaded[0].engine, seqs, args.repeats), "settings": {}}
    best: dict[int, dict] = {}
    for _ in range(args.repeats):
        for m in SETTINGS:
            stats = EngineStats()
            cpu, t0 = time.process_time(), time.perf_counter()
            loaded[m].engine.run({"input_ids": seqs}, stats=stats)
            wall = time.perf_counter() - t0
            if len(seqs) / wall > best.get(m, {}).get("rows_per_s", 0):
                best[m] = {"rows_per_s": round(len(seqs) / wall, 1), "cores": round((time.process_time() - cpu) / wall, 2),
                           "busy_fraction": round(stats.busy_s / stats.run_s, 3)}
    out["settings"] = {f"max_in_flight={m}": {**best[m], "vs_0": round(best[m]["rows_per_s"] / best[0]["rows_per_s"], 3)}
                       for m in SETTINGS}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
