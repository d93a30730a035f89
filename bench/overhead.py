"""Row (e) alone: per-row framework overhead with a trivial model, bulkinfer vs Beam RunInference, one run.

    JAX_PLATFORMS=cpu .venv/bin/python bench/overhead.py --rows 200000

Both pipelines read the same Parquet shards of short texts, run a model that returns each text's
length, and write Parquet, on an in-process FnApiRunner (bench/ours.py `overhead`, bench/peers.py
`run_inference_overhead`, as in bench/run.py).  Each side runs --repeats times, after one untimed run
of bulkinfer's; the best time is reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import corpus, ours, peers  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=".bench/overhead")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    short = corpus.short_rows(args.rows, corpus.texts(2000, 0))
    glob = corpus.write_shards(str(work / "input"), short, args.shards)
    ours.overhead(glob, str(work / "warm"), len(short))
    result = {"rows": len(short), "load_before": os.getloadavg()[0]}
    for key, fn in (("bulkinfer", ours.overhead), ("runinference", peers.run_inference_overhead)):
        times = []
        for k in range(args.repeats):
            out = work / f"out-{key}-{k}"
            times.append(fn(glob, str(out), len(short))["us_per_row"])
            if corpus.parquet_rows(str(out), prefix="part") != len(short):
                raise RuntimeError(f"{key} wrote the wrong number of rows to {out}")
        result[key] = {"us_per_row_best": round(min(times), 3), "us_per_row_all": [round(t, 3) for t in times]}
    result["ratio"] = round(result["runinference"]["us_per_row_best"] / result["bulkinfer"]["us_per_row_best"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
