"""Every row of BENCHMARKS.md's table, side by side in one run, on two corpora: synthetic texts and real
English text (the long descriptions of the installed packages, bench/corpus.py `real_texts`).

    python bench/run.py                          # the full table (about 15 to 20 minutes on 2 cores)
    python bench/run.py --quick                  # a short run: 2,000 rows, 20,000 overhead rows, 600 real rows
    python bench/run.py --write BENCHMARKS.md    # also rewrite the file's generated block (`make bench`)

Order: the ONNX export (untimed, cached under WORKDIR/cache, a subprocess), bulkinfer's rows (a, b), the
trivial-model overhead (e), ONNX Runtime (f, g) and the whole-process rows (subprocesses), the real-text
rows, Ray Data (h, subprocesses), then the PyTorch peers (c, d), so JAX never shares the process with a
loaded PyTorch while it is timed.  If the run would overrun --budget-min, (c) and (d) run on a prefix of
the synthetic corpus and the table says so.
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

from bench import corpus, onnx_peer, ours, peers, process, report  # noqa: E402
from bench.timing import timed  # noqa: E402
from bulkinfer.beam.loading import load_shared  # noqa: E402

KERNEL = (64, 128)  # [B, L] of the forward-pass comparison: a full batch of the 128 bucket


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="corpus rows for (a)-(d) (default 20000)")
    parser.add_argument("--overhead-rows", type=int, default=200_000, help="rows for (e) (default 200000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4, help="Parquet input shards (default 4)")
    parser.add_argument("--quick", action="store_true", help="a short run: --rows 2000 --overhead-rows 20000")
    parser.add_argument("--real-rows", type=int, default=0,
                        help="use only the first N rows of the real-text corpus (default 0: all of it)")
    parser.add_argument("--budget-min", type=float, default=19.0,
                        help="run time to stay under; the peers (c, d) use a prefix of the synthetic corpus "
                        "if needed (default 19)")
    parser.add_argument("--workdir", default=".bench", help="scratch directory for Parquet in/out")
    parser.add_argument("--write", metavar="PATH", help="rewrite the generated block of this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.overhead_rows, args.real_rows = 2_000, 20_000, args.real_rows or 600
    if args.rows < 1 or args.overhead_rows < 1:
        parser.error("--rows and --overhead-rows must be >= 1")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    work = Path(args.workdir).resolve()
    cache = work / "cache"  # the ONNX files and bulkinfer's compilation cache outlive a run
    for old in work.glob("*") if work.exists() else ():
        if old != cache:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    threads = len(os.sched_getaffinity(0))
    m: dict = {"seed": args.seed, "shards": args.shards, "st_batch": peers.ST_BATCH, "kernel": KERNEL,
               "threads": threads, "ort_batch": onnx_peer.BATCH}

    log("ONNX export (fp32, then int8 dynamic quantization), cached; bulkinfer's compilation cache filled")
    _, out = process.run([sys.executable, "bench/onnx_peer.py", "export", "--out", str(cache / "onnx")])
    m["onnx"] = onnx = json.loads(out.strip().splitlines()[-1])
    xla_cache = str(cache / "xla")
    warm_t, _ = process.run([sys.executable, "-c", WARM_CACHE, xla_cache])
    m["xla_cache_warm_s"] = warm_t.wall_s

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

    m["a_embed"] = embed_in_memory(spec, texts)
    log(f"(a) embed(texts), tokenization inside: {m['a_embed']['rows_per_s']:.1f} rows/s")

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

    log("(f), (g) ONNX Runtime fp32 and int8 in memory; whole-process Parquet -> Parquet, synthetic corpus")
    m["f"] = onnx_peer.in_memory(onnx["fp32"], texts, threads)
    m["g"] = onnx_peer.in_memory(onnx["int8"], texts, threads)
    m["whole"] = {"ort": whole_ort(onnx["fp32"], input_glob, work / "out-f-whole", threads, len(texts)),
                  "ours": whole_ours(input_glob, work / "out-b-whole", xla_cache, len(texts))}
    log(f"(f) {m['f']['rows_per_s']:.1f} rows/s, (g) {m['g']['rows_per_s']:.1f} rows/s; whole process: ORT "
        f"{m['whole']['ort']['rows_per_s']:.1f}, bulkinfer {m['whole']['ours']['rows_per_s']:.1f} rows/s")

    m["real"] = real_rows(args, spec, work, onnx, xla_cache, threads)

    m["torch"] = peers.torch_setup(threads)
    rate = peers.st_rate(texts[:256])
    real_texts = m["real"]["texts"]
    m["real"]["c"] = rc = peers.st_encode(real_texts)
    for key in ("f", "g", "a_embed"):
        m["real"][key]["cosine"] = cosine(m["real"][key]["embeddings"], rc["embeddings"])
    log(f"(c) on the real text: {rc['rows_per_s']:.1f} rows/s")
    left_s = args.budget_min * 60 - (time.perf_counter() - t_start)
    # (d) runs at most as fast as (c), with more padding: budget (c) + (d) as 2.5 times (c).
    c_rows = min(len(texts), max(1000, int(0.85 * left_s * rate / 2.5)))
    log(f"(c) sentence-transformers encode, {c_rows:,} rows, torch threads {m['torch']['torch_threads']} "
        f"(calibration {rate:.1f} rows/s, {left_s:.0f} s of the budget left)")
    m["c"] = c = peers.st_encode(texts[:c_rows])
    c["mean_tokens"] = float(a["lengths"][:c_rows].mean())
    m["diff_ac"] = float(np.abs(a["embeddings"][:c_rows] - c["embeddings"]).max())
    for key in ("f", "g", "a_embed"):
        m[key]["cosine"] = cosine(m[key]["embeddings"][:c_rows], c["embeddings"])
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
             commit=report.commit(), machine=report.machine(), versions=report.versions(), cpu=report.cpu(),
             threads_note=report.thread_settings(threads))
    block = report.render(m)
    print(block)
    with open(work / "results.json", "w") as f:
        json.dump(_plain(m), f, indent=1)
    if args.write:
        report.write(args.write, block)
        log(f"wrote {args.write}")


# Fills the persistent compilation cache with every shape of the default bucketing (untimed), so the
# whole-process rows and the Ray actors start warm, as a long-lived job's workers would.
WARM_CACHE = """
import sys, bulkinfer
bulkinfer.TextEmbedder.from_name("minilm", compilation_cache_dir=sys.argv[1], warmup=True).load()
"""


def embed_in_memory(spec, texts: list[str]) -> dict:
    """bulkinfer in memory as a user calls it: `embed(texts)` with the loaded, warmed model (tokenization,
    the engine's batching and the copies back inside the timing), the counterpart of (f) in memory."""
    loaded = load_shared(spec)
    loaded.embed(texts[:64])
    with timed() as t:
        out = loaded.embed(texts)
    return {"timing": t, "rows": len(texts), "rows_per_s": len(texts) / t.wall_s, "embeddings": out}


def whole_ours(input_glob: str, out: Path, xla_cache: str, rows: int) -> dict:
    """bulkinfer as a whole process: `python -m bulkinfer.cli run` from start to exit, Parquet -> Parquet,
    its compilation cache warm (the model is loaded and its shapes read from the cache inside)."""
    t, _ = process.run([sys.executable, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--input", input_glob,
                        "--output", str(out), "--compilation-cache", xla_cache])
    report_ = json.loads((out / "report.json").read_text())
    if report_["rows_out"] != rows or report_["rows_failed"]:
        raise RuntimeError(f"bulkinfer run wrote {report_['rows_out']} rows ({report_['rows_failed']} failed) of {rows}")
    # report.json's elapsed_s is the job (load, pipeline); the rest is interpreter start, imports, flags.
    return {"timing": t, "rows": rows, "rows_per_s": rows / t.wall_s, "job_s": report_["elapsed_s"],
            "startup_s": t.wall_s - report_["elapsed_s"]}


def whole_ort(model: str, input_glob: str, out: Path, threads: int, rows: int) -> dict:
    """ONNX Runtime as a whole process: `python bench/onnx_peer.py job` from start to exit, Parquet -> Parquet
    (imports, session creation, read, tokenize, run, write)."""
    t, stdout = process.run([sys.executable, "bench/onnx_peer.py", "job", "--model", model, "--input", input_glob,
                             "--output", str(out), "--threads", str(threads)])
    written = corpus.parquet_rows(str(out), prefix="part")
    if written != rows:
        raise RuntimeError(f"ONNX Runtime job wrote {written} rows of {rows}")
    r = json.loads(stdout.strip().splitlines()[-1])
    # job_s: read, tokenize, run, write; the rest is interpreter start, imports and session creation.
    return {"timing": t, "rows": rows, "rows_per_s": rows / t.wall_s, "job_s": r["job_s"],
            "startup_s": t.wall_s - r["job_s"], "session_s": r["session_s"]}


def ray_row(model: str, input_dir: Path, out: Path, threads: int, rows: int, xla_cache: str) -> dict:
    """(h) Ray Data in its own process (bench/ray_peer.py); the pipeline's own wall and CPU from its report."""
    t, stdout = process.run([sys.executable, "bench/ray_peer.py", "--model", model, "--input", str(input_dir),
                             "--output", str(out), "--threads", str(threads), "--compilation-cache", xla_cache])
    r = json.loads(stdout.strip().splitlines()[-1])
    written = corpus.parquet_rows(str(out))
    if written != rows:
        raise RuntimeError(f"Ray Data ({model}) wrote {written} rows of {rows}")
    from bench.timing import Timing

    timing = Timing(wall_s=r["wall_s"], cpu_s=r["cpu_s"], load_before=t.load_before)
    return {**r, "timing": timing, "process": t, "rows": rows, "rows_per_s": rows / r["wall_s"]}


def real_rows(args, spec, work: Path, onnx: dict, xla_cache: str, threads: int) -> dict:
    """The rows on real English text: bulkinfer in memory and Parquet -> Parquet (steady state), ONNX
    Runtime fp32/int8 in memory and Parquet -> Parquet (steady state), both as whole processes (order
    ORT, bulkinfer, bulkinfer, ORT; the mean of the two of each), and Ray Data with each model."""
    texts, info = corpus.real_texts()
    if args.real_rows:
        texts = texts[:args.real_rows]
    r: dict = {"texts": texts, "info": info}
    in_dir = work / "input-real"
    glob = corpus.write_shards(str(in_dir), texts, args.shards)
    loaded = load_shared(spec)
    lengths = np.fromiter((len(s) for s in loaded.tokenize(texts)), np.int64)
    r["corpus"] = corpus.length_summary(lengths, loaded.max_length)
    log(f"real text: {len(texts):,} rows from {info['distributions']} packages, mean {lengths.mean():.1f} tokens")
    r["a_embed"] = embed_in_memory(spec, texts)
    r["b"] = ours.end_to_end(spec, glob, str(work / "out-real-b"))
    r["f"] = onnx_peer.in_memory(onnx["fp32"], texts, threads)
    r["g"] = onnx_peer.in_memory(onnx["int8"], texts, threads)
    r["f_parquet"] = onnx_peer.parquet_steady(onnx["fp32"], glob, str(work / "out-real-f"), threads, len(texts))
    log(f"real text: bulkinfer embed {r['a_embed']['rows_per_s']:.1f}, job {r['b']['rows_per_s']:.1f}; ORT fp32 "
        f"{r['f']['rows_per_s']:.1f}, int8 {r['g']['rows_per_s']:.1f}, fp32 Parquet {r['f_parquet']['rows_per_s']:.1f} rows/s")
    runs = {"ort": [], "ours": []}
    for k, side in enumerate(("ort", "ours", "ours", "ort")):
        out = work / f"out-real-whole-{side}-{k}"
        runs[side].append(whole_ort(onnx["fp32"], glob, out, threads, len(texts)) if side == "ort"
                          else whole_ours(glob, out, xla_cache, len(texts)))
    r["whole"] = {side: _mean_runs(v) for side, v in runs.items()}
    log(f"real text, whole process: ORT {r['whole']['ort']['rows_per_s']:.1f}, bulkinfer "
        f"{r['whole']['ours']['rows_per_s']:.1f} rows/s")
    for model in ("jax", "st"):
        r[f"h_{model}"] = ray_row(model, in_dir, work / f"out-real-ray-{model}", threads, len(texts), xla_cache)
        log(f"(h) Ray Data + {model}: {r[f'h_{model}']['rows_per_s']:.1f} rows/s (ray.init {r[f'h_{model}']['init_s']:.1f} s)")
    return r


def _mean_runs(runs: list[dict]) -> dict:
    """Several runs of one row as one: wall and CPU averaged, load from the first, each run's rate kept."""
    from bench.timing import Timing

    t = Timing(wall_s=float(np.mean([x["timing"].wall_s for x in runs])),
               cpu_s=float(np.mean([x["timing"].cpu_s for x in runs])), load_before=runs[0]["timing"].load_before)
    return {"timing": t, "rows": runs[0]["rows"], "rows_per_s": runs[0]["rows"] / t.wall_s,
            "each_rows_per_s": [x["rows_per_s"] for x in runs],
            "startup_s": float(np.mean([x["startup_s"] for x in runs])), "job_s": float(np.mean([x["job_s"] for x in runs]))}


def cosine(x: np.ndarray, ref: np.ndarray) -> dict:
    """Mean and min row-wise cosine similarity of [N, D] embeddings x against ref."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "rows": int(len(cos))}


def _plain(x):
    """The measurements as JSON (timings as dicts, arrays dropped)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if not isinstance(v, np.ndarray) and k != "texts"}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return {**vars(x), "cores_used": x.cores_used}
    return x


if __name__ == "__main__":
    main()
