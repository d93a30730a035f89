"""Row (h): Ray Data `read_parquet -> map_batches(actor pool) -> write_parquet`, with bulkinfer's JAX engine
or with sentence-transformers as the model inside the actors.  Run as its own process by bench/run.py:

    python bench/ray_peer.py --model jax|st --input 'in/*.parquet' --output out/ --threads 2 \\
        [--actors 1] [--batch-rows 1024] [--compilation-cache DIR]

`ray.init` starts a local cluster of `--threads` logical CPUs (no dashboard, a 1 GiB object store);
each actor takes 1 logical CPU, so read and write tasks keep the rest.  An actor loads its model once in
`__init__` (`TextEmbedder.from_name("minilm").load()`, or `SentenceTransformer` with torch set to
`--threads` intra-op threads) and maps pyarrow batches of `--batch-rows` rows (id, text) to (id,
embedding list<float32>).  The JAX actor reads its compiled shapes from the persistent compilation cache
that bench/run.py warmed.  Prints one JSON line: the pipeline's wall seconds (from building the Dataset
to the written files, actor start-up and model load included; `ray.init` excluded and given apart).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Actor:
    """Loads a model once per actor; writes its load time and time inside the model to `report` (JSON)."""

    def __init__(self, report: str):
        self.report, t0 = report, time.perf_counter()
        self.load()
        self.times = {"load_s": time.perf_counter() - t0, "model_s": 0.0, "rows": 0}
        self._write()

    def __call__(self, batch):
        texts = batch.column("text").to_pylist()
        t0 = time.perf_counter()
        vectors = self.embed(texts)  # [N, 384] float32
        self.times["model_s"] += time.perf_counter() - t0
        self.times["rows"] += len(texts)
        self._write()
        return _table(batch, vectors)

    def _write(self):
        with open(self.report + ".tmp", "w") as f:
            json.dump(self.times, f)
        os.replace(self.report + ".tmp", self.report)


class JaxEmbed(_Actor):
    """bulkinfer's engine in a Ray actor: `TextEmbedder.load()` once, `embed(texts)` per batch."""

    def __init__(self, report: str, compilation_cache: str | None):
        self.compilation_cache = compilation_cache
        super().__init__(report)

    def load(self):
        import bulkinfer

        self.model = bulkinfer.TextEmbedder.from_name("minilm", compilation_cache_dir=self.compilation_cache).load()

    def embed(self, texts):
        return self.model.embed(texts)


class StEmbed(_Actor):
    """sentence-transformers in a Ray actor: encode(batch_size=32), as row (c) runs it."""

    def __init__(self, report: str, threads: int):
        self.threads = threads
        super().__init__(report)

    def load(self):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.threads)
        sys.path.insert(0, str(ROOT))
        from bench.onnx_peer import minilm_dir

        self.model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def embed(self, texts):
        return self.model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, with reaped children) of process `root` and all its live descendants,
    from /proc: Ray's raylet, workers and actors are descendants of the driver."""
    parent, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    total = 0.0
    for pid in cpu:
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        if p == root:
            total += cpu[pid]
    return total


def _table(batch, vectors):
    """(id, embedding list<float32>) from an input pyarrow batch and its [N, D] float32 vectors."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, np.float32)
    offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
    return pa.table({"id": batch.column("id"), "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel()))})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("jax", "st"), required=True)
    parser.add_argument("--input", required=True, help="directory of Parquet files (id, text)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--compilation-cache", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    t0 = time.perf_counter()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=args.threads, include_dashboard=False, object_store_memory=2**30, log_to_driver=False,
             runtime_env={"env_vars": env})
    init_s = time.perf_counter() - t0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    report = os.path.abspath(args.output.rstrip("/") + "-actor.json")
    if args.model == "jax":
        fn, kwargs = JaxEmbed, {"report": report, "compilation_cache": args.compilation_cache}
    else:
        fn, kwargs = StEmbed, {"report": report, "threads": args.threads}
    t1, cpu1 = time.perf_counter(), tree_cpu_s(os.getpid())
    ds = ray.data.read_parquet(args.input, columns=["id", "text"])
    ds = ds.map_batches(fn, fn_constructor_kwargs=kwargs, batch_size=args.batch_rows, batch_format="pyarrow",
                        concurrency=args.actors, num_cpus=1)
    ds.write_parquet(args.output)
    wall_s, cpu_s = time.perf_counter() - t1, tree_cpu_s(os.getpid()) - cpu1
    ray.shutdown()
    with open(report) as f:
        actor = json.load(f)  # with one actor; with several, the last one to write
    print(json.dumps({"wall_s": wall_s, "cpu_s": cpu_s, "init_s": init_s, "actors": args.actors,
                      "batch_rows": args.batch_rows, "actor": actor}))


if __name__ == "__main__":
    main()
