"""bulkinfer against ONNX Runtime fp32 as whole processes, Parquet -> Parquet, on the real-text corpus: the
issue's end-to-end row on its own, without the rest of `make bench` (about 3 minutes on 2 cores).

    .venv-bench/bin/python bench/whole_process.py --rounds 3
    .venv-bench/bin/python bench/whole_process.py --rounds 2 --copies 4    # 4 x the corpus: fixed costs amortized
    .venv-bench/bin/python bench/whole_process.py --rounds 2 --corpus synthetic   # make bench's 20,000 short rows

Each round runs ONNX Runtime (`bench/onnx_peer.py job`, 2 intra-op threads = this process's cores) and
bulkinfer (`python -m bulkinfer.cli run --model minilm`, its compilation cache warm) in alternating order,
each a fresh process from start to exit, on the same 4 Parquet shards of `corpus.real_texts()` (`--corpus synthetic`: `make bench`'s
`corpus.texts(20000, seed=0)`, mostly short rows) (with
`--copies N`, the corpus N times over in 4N shards, ids distinct: a longer job, in which each process's
fixed costs, start-up and exit, weigh less); the ONNX
export and the cache warm-up are made first and not timed (the cache under `--workdir`/cache is shared
with `make bench`).  Prints one JSON object: each run's wall seconds, CPU seconds, 1-minute load before
it, idle core-seconds (cores x wall - CPU) and start-up seconds (wall minus the job's own), the best and
the mean rate of each side, and the ratio bulkinfer / ONNX Runtime of both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import corpus, process, run  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, interleaved (default 3)")
    parser.add_argument("--copies", type=int, default=1, help="the corpus this many times over (default 1)")
    parser.add_argument("--corpus", choices=("real", "synthetic"), default="real",
                        help="real English text (default) or make bench's 20,000 synthetic rows")
    parser.add_argument("--workdir", default=".bench")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    cache = work / "cache"
    threads = len(os.sched_getaffinity(0))
    _, out = process.run([sys.executable, "bench/onnx_peer.py", "export", "--out", str(cache / "onnx")])
    onnx = json.loads(out.strip().splitlines()[-1])
    xla_cache = str(cache / "xla")
    process.run([sys.executable, "-c", run.WARM_CACHE, xla_cache])
    texts, info = corpus.real_texts() if args.corpus == "real" else (corpus.texts(20000, seed=0), {})
    texts = texts * args.copies
    name = f"whole-input-{args.corpus}" + ("" if args.copies == 1 else f"-x{args.copies}")
    glob = corpus.write_shards(str(work / name), texts, 4 * args.copies)
    runs: dict = {"ort": [], "bulkinfer": []}
    for k in range(args.rounds):
        for side in (("ort", "bulkinfer") if k % 2 == 0 else ("bulkinfer", "ort")):
            out_dir = work / f"whole-out-{side}-{k}"
            shutil.rmtree(out_dir, ignore_errors=True)  # a finished job there would be resumed, not rerun
            r = (run.whole_ort(onnx["fp32"], glob, out_dir, threads, len(texts)) if side == "ort"
                 else run.whole_ours(glob, out_dir, xla_cache, len(texts)))
            t = r["timing"]
            runs[side].append({"wall_s": round(t.wall_s, 2), "cpu_s": round(t.cpu_s, 2), "load_1min": t.load_before,
                               "idle_core_s": round(threads * t.wall_s - t.cpu_s, 2),
                               "startup_s": round(r["startup_s"], 2), "rows_per_s": round(r["rows_per_s"], 1)})
    summary = {side: {"best_rows_per_s": max(x["rows_per_s"] for x in v),
                      "mean_rows_per_s": round(len(v) * len(texts) / sum(x["wall_s"] for x in v), 1)}
               for side, v in runs.items()}
    print(json.dumps({"corpus": args.corpus, "rows": len(texts), "copies": args.copies, "corpus_sha256": info.get("sha256"), "threads": threads, "runs": runs,
                      "summary": summary,
                      "ratio_best": round(summary["bulkinfer"]["best_rows_per_s"] / summary["ort"]["best_rows_per_s"], 3),
                      "ratio_mean": round(summary["bulkinfer"]["mean_rows_per_s"] / summary["ort"]["mean_rows_per_s"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
