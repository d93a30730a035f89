"""MiniLM through the engine, warmed: rows/s of `embed` and of the engine alone, on one process.

    JAX_PLATFORMS=cpu .venv/bin/python bench/engine_throughput.py [--rows 2000] [--repeats 3]

Embeds `testing.synthetic_texts(rows, seed=1)` once to compile every shape the mix uses, then
`repeats` more times, printing one JSON line: rows/s per repeat for `embed` (tokenize + engine) and
for the engine alone (`EngineStats.run_s`: padding, dispatch, waiting for results).  It uses only
`LoadedTextEmbedder.embed` and `EngineStats`, so the same script measures two commits side by side
(run it with PYTHONPATH set to each checkout, alternating; before the model contract, `embed` was
called `predict`).
"""

from __future__ import annotations

import argparse
import json
import time

from bulkinfer.models.text import TextEmbedder
from bulkinfer.runtime import EngineStats
from bulkinfer.testing import synthetic_texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=None, help="a persistent compilation cache directory")
    args = parser.parse_args(argv)
    loaded = TextEmbedder.from_name("minilm", compilation_cache_dir=args.cache).load()
    texts = synthetic_texts(args.rows, seed=1)
    loaded.embed(texts)  # compiles every shape this mix uses
    embed_rps, engine_rps = [], []
    for _ in range(args.repeats):
        stats = EngineStats()
        t0 = time.perf_counter()
        loaded.embed(texts, stats=stats)
        wall = time.perf_counter() - t0
        embed_rps.append(args.rows / wall)
        engine_rps.append(args.rows / stats.run_s)
    print(json.dumps({"rows": args.rows, "embed_rows_per_s": [round(r, 1) for r in embed_rps],
                      "engine_rows_per_s": [round(r, 1) for r in engine_rps],
                      "compiles": loaded.engine.stats.compiles}))


if __name__ == "__main__":
    main()
