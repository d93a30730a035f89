"""How the server's batcher groups 16 clients' requests into model calls, and what each grouping pads.

    .venv/bin/python bench/remote_calls.py                                   # this checkout's batcher
    git show f420372:bulkinfer/serve/batcher.py > /tmp/old_batcher.py
    .venv/bin/python bench/remote_calls.py --batcher /tmp/old_batcher.py     # an older one

1. Calls: `DynamicBatcher` with a `predict` that sleeps `--ms-per-row` per row (no model), and
   `--clients` threads that each send their share of `--rows` rows in `--request-rows`-row requests,
   waiting a random 0..`--turnaround-ms` ms between a reply and their next request (seeded).  Prints
   the rows of each model call.  Thread timing varies, so the groups vary a little from run to run.
2. Padding, with no timing at all: the MiniLM tokenizer's lengths of `synthetic_texts(--rows)`, planned
   by the default `Bucketing` call by call (consecutive rows), for the calls found and for one call
   of every row (the local engine).  Padded tokens are what the model computes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_batcher(path: Path):
    spec = importlib.util.spec_from_file_location("batcher_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def calls(module, *, rows: int, clients: int, request_rows: int, ms_per_row: float, turnaround_ms: float,
          delay_s: float, seed: int) -> list[int]:
    """Rows of each model call, in order."""
    sizes: list[int] = []

    def predict(values):
        sizes.append(len(values))
        time.sleep(len(values) * ms_per_row / 1000)
        return np.zeros((len(values), 1), np.float32)

    batcher = module.DynamicBatcher(predict, max_batch_rows=1024, max_queue_delay_s=delay_s)
    takes_source = "source" in module.DynamicBatcher.submit.__code__.co_varnames
    requests = [list(range(i, min(i + request_rows, rows))) for i in range(0, rows, request_rows)]
    shares = [requests[k::clients] for k in range(clients)]
    rng = random.Random(seed)
    waits = [[rng.uniform(0, turnaround_ms) / 1000 for _ in share] for share in shares]

    def client(k: int) -> None:
        for request, wait in zip(shares[k], waits[k]):
            time.sleep(wait)
            (batcher.submit(request, source=k) if takes_source else batcher.submit(request)).result()
        if takes_source:
            batcher.forget(k)  # the client's connection closes

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close(10)
    return sizes


def padded_tokens(lengths: np.ndarray, sizes: list[int]) -> int:
    from bulkinfer.runtime import Bucketing

    bucketing, pos, total = Bucketing.for_platform("cpu").for_max_length(256), 0, 0
    for n in sizes:
        total += sum(batch * length for batch, length, _ in bucketing.plan(lengths[pos : pos + n]))
        pos += n
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batcher", type=Path, default=ROOT / "bulkinfer" / "serve" / "batcher.py")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--request-rows", type=int, default=64)
    parser.add_argument("--ms-per-row", type=float, default=1.74, help="the model's time per row (575 rows/s)")
    parser.add_argument("--turnaround-ms", type=float, default=30.0)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="max_queue_delay (the server's default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bulkinfer.models import checkpoint
    from bulkinfer.models.text import TextEmbedder
    from bulkinfer.testing import synthetic_texts

    sizes = calls(load_batcher(args.batcher), rows=args.rows, clients=args.clients, request_rows=args.request_rows,
                  ms_per_row=args.ms_per_row, turnaround_ms=args.turnaround_ms, delay_s=args.delay_ms / 1000,
                  seed=args.seed)
    tokenizer = checkpoint.load_tokenizer(Path(TextEmbedder.from_name("minilm").path), 256)
    lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(synthetic_texts(args.rows, seed=0))])
    local = padded_tokens(lengths, [args.rows])
    sys.stdout.write(f"batcher {args.batcher}: {len(sizes)} model calls of {sizes} rows\n")
    for name, grouping in (("one call (local engine)", [args.rows]), ("these calls", sizes)):
        padded = padded_tokens(lengths, grouping)
        sys.stdout.write(f"{name}: padded tokens {padded}, padding efficiency {lengths.sum() / padded:.3f}, "
                         f"local/this {local / padded:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
