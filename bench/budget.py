"""Token budget on the CPU: MiniLM's engine at several token budgets, side by side in one process.

    JAX_PLATFORMS=cpu .venv-bench/bin/python bench/budget.py --budgets 512,1024,2048,4096 --repeats 3

Each budget gets its own loaded engine (same weights, the default length ladder capped at the model's max
length), every shape compiled before timing.  The timed call is `engine.run` over the pre-tokenized corpus
(real English text, `bench/corpus.real_texts`, and the synthetic mix, `bench/corpus.texts`), the budgets
interleaved round by round so that a change of machine load hits them alike; each row keeps its best
round.  Prints one JSON object: rows/s, padding efficiency and batches per (corpus, budget), and each
budget's rows/s over the 2048 row (the default before `Bucketing.for_platform`), with the 1-minute load
average and this process's cores.  Run it with `taskset -c 0` to see one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import corpus  # noqa: E402
from bulkinfer.models.text import LoadedTextEmbedder, TextEmbedder  # noqa: E402
from bulkinfer.runtime import Bucketing, EngineStats  # noqa: E402

BASE = 2048


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="512,1024,2048,4096", help="comma-separated token budgets")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each budget keeps its best")
    parser.add_argument("--synthetic-rows", type=int, default=3000)
    args = parser.parse_args(argv)
    budgets = sorted({int(b) for b in args.budgets.split(",")} | {BASE})
    corpora = {"real": corpus.real_texts()[0], "synthetic": corpus.texts(args.synthetic_rows, seed=0)}
    engines = {b: LoadedTextEmbedder(TextEmbedder.from_name("minilm", bucketing=Bucketing(token_budget=b)))
               for b in budgets}
    seqs = {name: engines[BASE].tokenize(texts) for name, texts in corpora.items()}
    for loaded in engines.values():
        loaded.engine.warmup()
    best: dict = {}
    c0, w0 = os.times(), time.perf_counter()
    for _ in range(args.repeats):
        for name, s in seqs.items():
            for b, loaded in engines.items():
                stats = EngineStats()
                t = time.perf_counter()
                loaded.engine.run({"input_ids": s}, stats=stats)
                rate = len(s) / (time.perf_counter() - t)
                if rate > best.get((name, b), {}).get("rows_per_s", 0):
                    best[(name, b)] = {"rows_per_s": round(rate, 1), "padding_efficiency": round(stats.padding_efficiency, 3),
                                       "batches": stats.batches}
    c1, wall = os.times(), time.perf_counter() - w0
    out = {"cores": round((c1.user + c1.system - c0.user - c0.system) / wall, 2), "load_1min": os.getloadavg()[0],
           "affinity": len(os.sched_getaffinity(0)), "rows": {n: len(s) for n, s in seqs.items()}, "results": {}}
    for name in seqs:
        out["results"][name] = {b: {**best[(name, b)], "vs_2048": round(best[(name, b)]["rows_per_s"] / best[(name, BASE)]["rows_per_s"], 3)}
                                for b in budgets}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
