"""Token budget and packing on the CPU: MiniLM's engine at several settings, side by side in one process.

    JAX_PLATFORMS=cpu .venv-bench/bin/python bench/budget.py --budgets 512,1024,2048,4096 --repeats 3
    JAX_PLATFORMS=cpu .venv-bench/bin/python bench/budget.py --budgets 1024 --packing off,on --repeats 5
    JAX_PLATFORMS=cpu .venv-bench/bin/python bench/budget.py --budgets 1024 --in-flight 0,2 --repeats 5

Each (budget, packing, batches in flight) gets its own loaded engine (same weights, the default length
ladder capped at the model's max length), every shape compiled before timing.  The timed call is
`engine.run` over the pre-tokenized corpus (real English text, `bench/corpus.real_texts`, and the
synthetic mix, `bench/corpus.texts`), the settings interleaved round by round so that a change of
machine load hits them alike; each row keeps its best round.  Prints one JSON object: rows/s, CPU ms
per row (this process's, over that round), padding efficiency (real / computed tokens) and batches per
(corpus, setting), and each row's rows/s over the base row's (budget 2048 with the first packing and
in-flight count listed; 2048 was the default before `Bucketing.for_platform`).  Rows are named
budget/packing, plus /max_in_flight when several are given.  With the 1-minute load average and this
process's cores.  Run it with `taskset -c 0` to see one core.
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
    parser.add_argument("--packing", default="on",
                        help="comma-separated: on (padding-free batches, the CPU default), off (padded)")
    parser.add_argument("--in-flight", default="2",
                        help="comma-separated max_in_flight values (batches dispatched ahead, each on its own "
                             "thread; 0: one batch at a time); default 2, the engine's")
    parser.add_argument("--synthetic-rows", type=int, default=3000)
    args = parser.parse_args(argv)
    budgets = sorted({int(b) for b in args.budgets.split(",")} | {BASE})
    packings = list(dict.fromkeys(p.strip() for p in args.packing.split(",")))
    if set(packings) - {"on", "off"}:
        parser.error(f"--packing takes on and off, got {args.packing!r}")
    in_flights = list(dict.fromkeys(int(m) for m in args.in_flight.split(",")))
    corpora = {"real": corpus.real_texts()[0], "synthetic": corpus.texts(args.synthetic_rows, seed=0)}
    def row_name(b, p, m):
        return f"{b}/{p}" + (f"/{m}" if len(in_flights) > 1 else "")

    engines = {row_name(b, p, m): LoadedTextEmbedder(TextEmbedder.from_name(
        "minilm", bucketing=Bucketing(token_budget=b), packed=p == "on", max_in_flight=m))
               for b in budgets for p in packings for m in in_flights}
    base = row_name(BASE, packings[0], in_flights[0])
    seqs = {name: engines[base].tokenize(texts) for name, texts in corpora.items()}
    for loaded in engines.values():
        loaded.engine.warmup()
    best: dict = {}
    c0, w0 = os.times(), time.perf_counter()
    for _ in range(args.repeats):
        for name, s in seqs.items():
            for b, loaded in engines.items():
                stats = EngineStats()
                cpu, t = time.process_time(), time.perf_counter()
                loaded.engine.run({"input_ids": s}, stats=stats)
                rate = len(s) / (time.perf_counter() - t)
                if rate > best.get((name, b), {}).get("rows_per_s", 0):
                    best[(name, b)] = {"rows_per_s": round(rate, 1),
                                       "cpu_ms_per_row": round(1e3 * (time.process_time() - cpu) / len(s), 2),
                                       "padding_efficiency": round(stats.padding_efficiency, 3),
                                       "batches": stats.batches}
    c1, wall = os.times(), time.perf_counter() - w0
    out = {"cores": round((c1.user + c1.system - c0.user - c0.system) / wall, 2), "load_1min": os.getloadavg()[0],
           "affinity": len(os.sched_getaffinity(0)), "rows": {n: len(s) for n, s in seqs.items()}, "results": {}}
    for name in seqs:
        out["results"][name] = {b: {**best[(name, b)], f"vs_{base}": round(best[(name, b)]["rows_per_s"] /
                                                                           best[(name, base)]["rows_per_s"], 3)}
                                for b in engines}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
