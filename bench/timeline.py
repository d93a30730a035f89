"""Where a whole `bulkinfer run` process spends its wall time: the phases of one MiniLM job, Parquet -> Parquet,
on the real-text shards that bench/whole_process.py wrote, its compilation cache warm.

    .venv-bench/bin/python bench/timeline.py [--rounds 2]      # after bench/whole_process.py

Each round runs the job twice in fresh processes (`python bench/timeline.py --child`): once exiting as the
`bulkinfer` command does (`bulkinfer.cli.entry`: `gc.freeze()` before exit) and once with a plain
`sys.exit(main())`.  The child prints the seconds since its interpreter started at which each phase
began and ended (imports, `TextEmbedder.from_name`, `build`, `Pipeline.run`, the inference DoFn's
setup, tokenization, `Engine.run`, the duplicate-id count) and when `main` returned; the parent adds
the process's end (its wait for the child).  Prints one JSON object per round: each variant's marks,
its exit seconds (end minus main's return) and wall seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"


def child(freeze: bool, out: str) -> None:
    t0 = time.time()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.time() - t0, 3)

    def wrap(owner, name: str) -> None:
        f = getattr(owner, name)
        label = f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"

        @functools.wraps(f)
        def timed(*a, **k):
            mark(f"{label} start")
            try:
                return f(*a, **k)
            finally:
                mark(f"{label} end")

        setattr(owner, name, timed)

    sys.path.insert(0, str(ROOT))
    import bulkinfer.cli as cli
    import bulkinfer.tasks.run as run_job

    mark("imports end")
    import apache_beam as beam

    from bulkinfer.beam import commit, transform
    from bulkinfer.models import text
    from bulkinfer.runtime import engine

    for owner, name in ((text.TextEmbedder, "from_name"), (run_job, "build"), (beam.Pipeline, "run"),
                        (transform._InferDoFn, "setup"), (text.LoadedTextEmbedder, "tokenize"), (engine.Engine, "run"),
                        (commit, "count_duplicate_ids")):
        wrap(owner, name)
    status = cli.main(["run", "--model", "minilm", "--input", str(WORK / "whole-input-real" / "*.parquet"), "--output", out,
                       "--compilation-cache", str(WORK / "cache" / "xla")])
    mark("main returned")
    print(json.dumps({"t0": t0, "marks": marks}), flush=True)
    if freeze:
        import gc

        gc.freeze()
    sys.exit(status)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["freeze", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child == "freeze", args.out)
    if not (WORK / "whole-input-real").is_dir():
        parser.error("no .bench/whole-input-real: run bench/whole_process.py first")
    results = []
    for _ in range(args.rounds):
        round_ = {}
        for variant in ("freeze", "plain"):
            out = WORK / f"timeline-out-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.time()
            p = subprocess.run([sys.executable, __file__, "--child", variant, "--out", str(out)], capture_output=True,
                               text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            end = time.time()
            if p.returncode:
                raise RuntimeError(f"the job failed: {p.stderr[-2000:]}")
            child_out = json.loads(p.stdout.strip().splitlines()[-1])
            marks = child_out["marks"]
            round_[variant] = {"marks": marks, "wall_s": round(end - start, 2),
                               "exit_s": round(end - child_out["t0"] - marks["main returned"], 3)}
        results.append(round_)
    print(json.dumps({"load_1min": os.getloadavg()[0], "rounds": results}, indent=1))


if __name__ == "__main__":
    main()
