"""Does pipelined dispatch pay?  Engine.run on MiniLM with max_in_flight 1 (no overlap) vs 2 and 4.

    JAX_PLATFORMS=cpu .venv/bin/python bench/pipelining.py [--rows 2000]

Reports, per setting, rows/s, the device-busy fraction (busy_s / run_s) and the host time spent
dispatching: async dispatch means the exe call returns before the batch has been computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from bulkinfer.models.text import TextEmbedder
from bulkinfer.testing import synthetic_texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args(argv)
    loaded = TextEmbedder.from_name("minilm").load()
    seqs = loaded.tokenize(synthetic_texts(args.rows, seed=1))
    engine = loaded.engine
    t0 = time.perf_counter()
    engine.run({"input_ids": seqs})  # compiles every shape this mix uses
    print(f"{args.rows} rows, first run (with compiles) {time.perf_counter() - t0:.1f}s, "
          f"{engine.stats.compiles} compiles, padding efficiency {engine.stats.padding_efficiency:.3f}")
    # Async dispatch: a call returns long before its batch is computed.
    shape = engine.bucketing.shapes()[0]  # (batch, length)
    exe = engine._executable(*shape)
    ids = np.ones(shape, np.int32)
    t0 = time.perf_counter()
    out = exe(engine._params, {"input_ids": ids, "mask": ids})
    t1 = time.perf_counter()
    out.block_until_ready()
    t2 = time.perf_counter()
    print(f"one {ids.shape} batch: dispatch returns after {1000 * (t1 - t0):.2f} ms, result after "
          f"{1000 * (t2 - t0):.1f} ms")
    for in_flight in (1, 2, 4, 2, 1):
        engine._max_in_flight = in_flight
        before = dataclasses.replace(engine.stats)
        t0 = time.perf_counter()
        engine.run({"input_ids": seqs})
        wall = time.perf_counter() - t0
        busy = engine.stats.busy_s - before.busy_s
        print(f"max_in_flight={in_flight}: {args.rows / wall:7.1f} rows/s, device busy {busy / wall:.3f} of the run")


if __name__ == "__main__":
    main()
