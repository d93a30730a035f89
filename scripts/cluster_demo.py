"""`make cluster-demo`: a local portable Beam cluster, one job on it, and the cluster stopped again.

Starts Beam's Python job service and two external SDK worker pools (each its own process, on free
127.0.0.1 ports), runs `bulkinfer run` on the first pool through `--runner PortableRunner` (the same Fn
API that Flink, Spark and Dataflow speak) with `--workers` SDK worker processes per stage working at
once (`--direct_num_workers`), prints the command, report.json and how many SDK worker processes ran
it, then stops and reaps every process, also on failure or Ctrl-C.

    python scripts/cluster_demo.py [--model minilm] [--input 'data/sample/*.jsonl'] [--output out/cluster-demo] [--workers 2]

Exit status: the job's (0 done).  Logs of every cluster process: OUTPUT-logs/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from bulkinfer.beam.local_cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--input", default="data/sample/*.jsonl", metavar="GLOB")
    parser.add_argument("--output", default="out/cluster-demo", metavar="DIR")
    parser.add_argument("--pools", type=int, default=2, help="external worker pools to start (default: 2)")
    parser.add_argument("--workers", type=int, default=2,
                        help="SDK worker processes per environment, working at once (default: 2)")
    args = parser.parse_args(argv)
    logs = Path(args.output + "-logs")
    with LocalCluster(pools=args.pools, log_dir=logs) as cluster:
        cmd = [sys.executable, "-m", "bulkinfer.cli", "run", "--model", args.model, "--input", args.input,
               "--output", args.output, "--overwrite", "--wave-units", "2",
               "--accelerator", "type:nvidia-h200;count:1", "--min-ram", "1GB", *cluster.pipeline_args(0, workers=args.workers)]
        print("cluster: job service", cluster.job_endpoint, "worker pools",
              ", ".join(f"127.0.0.1:{p}" for p in cluster.pool_ports), flush=True)
        print("$", shlex.join(["bulkinfer", *cmd[3:]]), flush=True)
        code = subprocess.run(cmd).returncode
        workers = cluster.workers_started(0)
    report = Path(args.output) / "report.json"
    if report.exists():
        print(json.dumps(json.loads(report.read_text()), indent=2))
    print(f"SDK worker processes started by pool 0: {workers}; cluster stopped; logs in {logs}/")
    return code


if __name__ == "__main__":
    sys.exit(main())
