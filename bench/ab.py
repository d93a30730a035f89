"""Two checkouts of bulkinfer side by side, alternating on one machine: MiniLM rows/s of the warmed
embed call and of the whole `bulkinfer run` job, so that a change is judged by a ratio, not an absolute.

    .venv/bin/python bench/ab.py --old ../old-checkout --new . [--rounds 3] [--rows 2000] [--job-rows 4000]

Each measurement runs in a fresh process with PYTHONPATH set to that checkout, sharing one XLA
compilation cache (so both sides run warm) and the same inputs: `testing.synthetic_texts`, and for the
job 4 Parquet shards of id + text.  Prints one JSON line per measurement and a summary with the
median of each side and new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in the measured checkout: warmed embed rows/s, 3 repeats.  Before the model contract (a6805ae),
# the list-of-texts entry point was `predict`; since, it is `embed`.
EMBED = """
import json, sys, time
from bulkinfer import TextEmbedder
from bulkinfer.testing import synthetic_texts
loaded = TextEmbedder.from_name("minilm", compilation_cache_dir=sys.argv[2]).load()
embed = getattr(loaded, "embed", None) or loaded.predict
texts = synthetic_texts(int(sys.argv[1]), seed=1)
embed(texts)
out = []
for _ in range(3):
    t0 = time.perf_counter(); embed(texts); out.append(len(texts) / (time.perf_counter() - t0))
print(json.dumps(out))
"""

SHARDS = """
import sys, pyarrow as pa, pyarrow.parquet as pq
from bulkinfer.testing import synthetic_texts
n, d = int(sys.argv[1]), sys.argv[2]
t = synthetic_texts(n, seed=0)
for k in range(4):
    ids = list(range(k, n, 4))
    pq.write_table(pa.table({"id": ids, "text": [t[i] for i in ids]}), f"{d}/in-{k}.parquet")
"""


def _python(checkout: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise RuntimeError(f"{checkout}: {' '.join(args[:3])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, type=Path, help="the checkout to compare against")
    parser.add_argument("--new", required=True, type=Path, help="the checkout under test")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of old and new (default 3)")
    parser.add_argument("--rows", type=int, default=2000, help="texts per embed call (default 2000)")
    parser.add_argument("--job-rows", type=int, default=4000, help="rows of the job's input (default 4000)")
    args = parser.parse_args(argv)
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    results: dict[str, dict[str, list[float]]] = {"embed": {"old": [], "new": []}, "job": {"old": [], "new": []}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "xla")
        _python(sides["new"], "-c", SHARDS, str(args.job_rows), tmp)
        for r in range(args.rounds):
            for side, checkout in sides.items():
                rates = json.loads(_python(checkout, "-c", EMBED, str(args.rows), cache))
                results["embed"][side] += rates
                print(json.dumps({"round": r, "side": side, "embed_rows_per_s": [round(x, 1) for x in rates]}))
        for r in range(args.rounds):
            for side, checkout in sides.items():
                out = os.path.join(tmp, f"out-{side}-{r}")
                _python(checkout, "-m", "bulkinfer.cli", "run", "--model", "minilm", "--input",
                        os.path.join(tmp, "in-*.parquet"), "--output", out, "--compilation-cache", cache)
                report = json.loads(Path(out, "report.json").read_text())
                results["job"][side].append(report["rows_per_s"])
                print(json.dumps({"round": r, "side": side, "job_rows_per_s": report["rows_per_s"],
                                  "elapsed_s": report["elapsed_s"], "rows_out": report["rows_out"]}))
    summary = {}
    for what, by_side in results.items():
        old, new = statistics.median(by_side["old"]), statistics.median(by_side["new"])
        summary[what] = {"old_median": round(old, 1), "new_median": round(new, 1), "new_over_old": round(new / old, 3)}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
