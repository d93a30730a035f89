"""XLA:CPU flags and batches in flight against the engine's defaults, on MiniLM's packed CPU engine.

    .venv-bench/bin/python bench/xla_flags.py --rounds 2
    .venv-bench/bin/python bench/xla_flags.py --variants "2|" "2|--xla_cpu_multi_thread_eigen=false" --rounds 3

Each variant ("MAX_IN_FLIGHT|XLA_FLAGS") runs in a fresh process (XLA reads its flags once per process),
the variants interleaved round by round so that a change of machine load hits them alike.  A child loads
MiniLM with a compilation cache of its own (`--cache`, so each variant compiles once; the cache key holds
$XLA_FLAGS), tokenizes `corpus.texts(3000, seed=0)` (or the real-text corpus with `--corpus real`), runs the
engine once to warm it, then `--repeats` times, and keeps its best: rows/s, CPU ms per row and cores
(CPU s / wall s of the timed call).  Prints one JSON line per child and, at the end, each variant's best
round over the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("2|", "2|--xla_cpu_multi_thread_eigen=false", "3|--xla_cpu_multi_thread_eigen=false",
                    "2|--xla_cpu_enable_concurrency_optimized_scheduler=true", "2|--xla_cpu_use_onednn=true",
                    "2|--xla_cpu_enable_fast_math=true", "2|--xla_cpu_prefer_vector_width=512")


def child(max_in_flight: int, repeats: int, which: str, cache: str) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import corpus
    from bulkinfer.models.text import LoadedTextEmbedder, TextEmbedder

    texts = corpus.texts(3000, seed=0) if which == "synthetic" else corpus.real_texts()[0]
    loaded = LoadedTextEmbedder(TextEmbedder.from_name("minilm", max_in_flight=max_in_flight,
                                                       compilation_cache_dir=cache))
    seqs = loaded.tokenize(texts)
    loaded.engine.run({"input_ids": seqs})  # every shape compiled or loaded
    best = None
    for _ in range(repeats):
        cpu, t = time.process_time(), time.perf_counter()
        loaded.engine.run({"input_ids": seqs})
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        row = {"rows_per_s": round(len(seqs) / wall, 1), "cpu_ms_per_row": round(1e3 * cpu / len(seqs), 3),
               "cores": round(cpu / wall, 2)}
        if best is None or row["rows_per_s"] > best["rows_per_s"]:
            best = row
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "max_in_flight": max_in_flight,
                      "corpus": which, **best, "load_1min": round(os.getloadavg()[0], 2)}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help='each "MAX_IN_FLIGHT|XLA_FLAGS"; the first is the base (default: the engine\'s own, "2|")')
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per child; each keeps its best")
    parser.add_argument("--corpus", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--cache", default=str(ROOT / ".bench" / "cache" / "xla-flags"))
    parser.add_argument("--child", nargs=2, metavar=("MAX_IN_FLIGHT", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(int(args.child[0]), int(args.child[1]), args.corpus, args.cache)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            in_flight, _, flags = variant.partition("|")
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
            out = subprocess.run([sys.executable, __file__, "--child", in_flight, str(args.repeats), "--corpus",
                                  args.corpus, "--cache", args.cache], env=env, capture_output=True, text=True,
                                 check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            if row["rows_per_s"] > best.get(variant, {}).get("rows_per_s", 0):
                best[variant] = row
    base = best[args.variants[0]]["rows_per_s"]
    print(json.dumps({v: {"rows_per_s": r["rows_per_s"], "cpu_ms_per_row": r["cpu_ms_per_row"],
                          "vs_base": round(r["rows_per_s"] / base, 3)} for v, r in best.items()}, indent=1))


if __name__ == "__main__":
    main()
