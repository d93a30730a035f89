"""Every row of BENCHMARKS.md's table, side by side in one process, on one synthetic corpus.

    python bench/run.py                          # the full table (about 6 to 15 minutes on 2 cores)
    python bench/run.py --quick                  # a short run: 2,000 rows, 20,000 overhead rows
    python bench/run.py --write BENCHMARKS.md    # also rewrite the file's generated block (`make bench`)

Order: bulkinfer's rows first (a, b), then the trivial-model overhead (e), then the PyTorch peers
(c, d), so JAX never shares the process with a loaded PyTorch while it is timed.  If the run would
overrun --budget-min, (c) and (d) run on a prefix of the corpus and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench import corpus, ours, peers, report  # noqa: E402
from bulkinfer.beam.loading import load_shared  # noqa: E402

KERNEL = (64, 128)  # [B, L] of the forward-pass comparison: a full batch of the 128 bucket


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="corpus rows for (a)-(d) (default 20000)")
    parser.add_argument("--overhead-rows", type=int, default=200_000, help="rows for (e) (default 200000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4, help="Parquet input shards (default 4)")
    parser.add_argument("--quick", action="store_true", help="a short run: --rows 2000 --overhead-rows 20000")
    parser.add_argument("--budget-min", type=float, default=16.0,
                        help="run time to stay under; the peers (c, d) use a prefix of the corpus if needed "
                        "(default 16)")
    parser.add_argument("--workdir", default=".bench", help="scratch directory for Parquet in/out")
    parser.add_argument("--write", metavar="PATH", help="rewrite the generated block of this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.overhead_rows = 2_000, 20_000
    if args.rows < 1 or args.overhead_rows < 1:
        parser.error("--rows and --overhead-rows must be >= 1")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    threads = len(os.sched_getaffinity(0))
    m: dict = {"seed": args.seed, "shards": args.shards, "st_batch": peers.ST_BATCH, "kernel": KERNEL}

    texts = corpus.texts(args.rows, args.seed)
    input_glob = corpus.write_shards(str(work / "input"), texts, args.shards)
    spec = ours.model_spec()

    log(f"(a) limit: load, tokenize, compile every shape, then engine.run over {len(texts):,} rows")
    m["a"] = a = ours.limit(spec, texts)
    m["corpus"] = {**corpus.length_summary(a["lengths"], a["max_length"]), "max_length": a["max_length"]}
    log(f"(a) {a['rows_per_s']:.1f} rows/s; warm-up compiled {a['warmup_compiles']} shapes in "
        f"{a['warmup_compile_s']:.1f} s")
    m["kernel_jax_ms"] = ours.kernel_ms(spec, *KERNEL, reps=3)

    log("(b) job.run, Parquet -> Parquet, in-process FnApiRunner")
    engine = load_shared(spec).engine
    engine_s0 = engine.stats.run_s
    m["b"] = b = ours.end_to_end(spec, input_glob, str(work / "out-b"))
    b["engine_s"] = engine.stats.run_s - engine_s0
    b["outside_us_per_row"] = (b["timing"].wall_s - b["engine_s"]) / b["rows"] * 1e6
    ids, vectors = corpus.read_column(str(work / "out-b"), "embedding", prefix="part")
    if len(ids) != len(texts):
        raise RuntimeError(f"(b) wrote {len(ids)} rows for {len(texts)} input rows")
    m["diff_ba"] = float(np.abs(np.asarray(vectors, np.float32) - a["embeddings"][ids]).max())
    log(f"(b) {b['rows_per_s']:.1f} rows/s, report {json.dumps(b['report'])}")

    log(f"(e) per-row overhead, trivial model, {args.overhead_rows:,} rows")
    short = corpus.short_rows(args.overhead_rows, texts)
    short_glob = corpus.write_shards(str(work / "input-e"), short, args.shards)
    e = {"startup_s": ours.pipeline_start_s()}
    e["read_only"] = ours.read_only(short_glob, len(short))
    e["ours"] = ours.overhead(short_glob, str(work / "out-e-ours"), len(short))
    e["runinference"] = peers.run_inference_overhead(short_glob, str(work / "out-e-ri"), len(short))
    for key in ("ours", "runinference"):
        written = corpus.parquet_rows(str(work / f"out-e-{'ours' if key == 'ours' else 'ri'}"), prefix="part")
        if written != len(short):
            raise RuntimeError(f"(e) {key} wrote {written} rows for {len(short)} input rows")
    m["e"] = e
    log(f"(e) bulkinfer {e['ours']['us_per_row']:.2f} µs/row, RunInference {e['runinference']['us_per_row']:.2f} µs/row")

    m["torch"] = peers.torch_setup(threads)
    rate = peers.st_rate(texts[:256])
    left_s = args.budget_min * 60 - (time.perf_counter() - t_start)
    # (d) runs at most as fast as (c), with more padding: budget (c) + (d) as 2.5 times (c).
    c_rows = min(len(texts), max(1000, int(0.85 * left_s * rate / 2.5)))
    log(f"(c) sentence-transformers encode, {c_rows:,} rows, torch threads {m['torch']['torch_threads']} "
        f"(calibration {rate:.1f} rows/s, {left_s:.0f} s of the budget left)")
    m["c"] = c = peers.st_encode(texts[:c_rows])
    c["mean_tokens"] = float(a["lengths"][:c_rows].mean())
    m["diff_ac"] = float(np.abs(a["embeddings"][:c_rows] - c["embeddings"]).max())
    m["kernel_torch_ms"] = peers.st_kernel_ms(*KERNEL, reps=3)
    m["kernel_torch1_ms"] = peers.st_kernel_ms(*KERNEL, reps=3, threads=1)
    log(f"(c) {c['rows_per_s']:.1f} rows/s")

    left_s = args.budget_min * 60 - (time.perf_counter() - t_start)
    d_rows = min(c_rows, max(1000, int(0.85 * left_s * c["rows_per_s"])))
    d_glob = input_glob if d_rows == len(texts) else corpus.write_shards(
        str(work / "input-d"), texts[:d_rows], args.shards)
    log(f"(d) RunInference + sentence-transformers, {d_rows:,} rows ({left_s:.0f} s of the budget left)")
    m["d"] = d = peers.run_inference_st(d_glob, str(work / "out-d"), d_rows)
    d["mean_tokens"] = float(a["lengths"][:d_rows].mean())
    written = corpus.parquet_rows(str(work / "out-d"), prefix="part")
    if written != d_rows:
        raise RuntimeError(f"(d) wrote {written} rows for {d_rows} input rows")
    log(f"(d) {d['rows_per_s']:.1f} rows/s")

    m.update(total_s=time.perf_counter() - t_start, date=report.today(), command=report.command(),
             commit=report.commit(), machine=report.machine(), versions=report.versions())
    block = report.render(m)
    print(block)
    with open(work / "results.json", "w") as f:
        json.dump(_plain(m), f, indent=1)
    if args.write:
        report.write(args.write, block)
        log(f"wrote {args.write}")


def _plain(x):
    """The measurements as JSON (timings as dicts, arrays dropped)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if not isinstance(v, np.ndarray)}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return {**vars(x), "cores_used": x.cores_used}
    return x


if __name__ == "__main__":
    main()
