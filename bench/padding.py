"""Padding efficiency and compiled shapes of candidate bucketings, on the synthetic length mix.

    JAX_PLATFORMS=cpu .venv/bin/python bench/padding.py [--rows 20000] [--flush-rows 8192] [--bundle-rows 0]

Tokenizes `bulkinfer.testing.synthetic_texts(rows)` with the MiniLM tokenizer (truncated at its
max_seq_length, 256), feeds the lengths to `Bucketing.plan` in flushes of `flush_rows` rows like
BulkInference does, and reports for each candidate: padding efficiency (real / padded tokens), the
shapes that may be compiled (`len(shapes())`) and those actually used, and the number of batches.

carry=yes runs only full batches on each flush and carries the short tails over to the next flush;
everything left is run at the end of the bundle (`--bundle-rows`, 0 = the whole corpus is one bundle).
Needs no model weights beyond the tokenizer and no jax.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from bulkinfer.models import checkpoint
from bulkinfer.models.registry import resolve_model_dir
from bulkinfer.runtime.buckets import DEFAULT_LENGTHS, Bucketing
from bulkinfer.testing import synthetic_texts

CANDIDATE_LENGTHS = {
    "pow2": (8, 16, 32, 64, 128, 256),
    "step8 (walking skeleton)": (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256),
    "step4": (8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256),
    "default (geo 1.2)": DEFAULT_LENGTHS,
}


def token_lengths(rows: int) -> np.ndarray:
    _, path = resolve_model_dir("minilm")
    tokenizer = checkpoint.load_tokenizer(path, 256)
    return np.array([len(e.ids) for e in tokenizer.encode_batch_fast(synthetic_texts(rows))])


def simulate(bucketing: Bucketing, lengths: np.ndarray, *, flush_rows: int, bundle_rows: int, carry: bool):
    """(real tokens, padded tokens, batches, shapes used) over the corpus, flushed like BulkInference."""
    padded = batches = 0
    used: set[tuple[int, int]] = set()
    bundle_rows = bundle_rows or len(lengths)
    for b0 in range(0, len(lengths), bundle_rows):
        bundle = lengths[b0 : b0 + bundle_rows]
        carried = np.zeros(0, np.int64)
        for f0 in range(0, len(bundle), flush_rows):
            chunk = np.concatenate([carried, bundle[f0 : f0 + flush_rows]])
            final = not carry or f0 + flush_rows >= len(bundle)
            plan = bucketing.plan(chunk, final=final)
            carried = chunk[bucketing.carry(chunk)] if not final else np.zeros(0, np.int64)
            for size, length, _ in plan:
                padded += size * length
                batches += 1
                used.add((size, length))
    return int(lengths.sum()), padded, batches, used


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--flush-rows", type=int, default=8192)
    parser.add_argument("--bundle-rows", type=int, default=0)
    parser.add_argument("--budgets", default="1024,2048,4096,8192")
    args = parser.parse_args(argv)

    lengths = token_lengths(args.rows)
    pct = np.percentile(lengths, [50, 90, 99])
    print(f"{args.rows} texts, tokens: mean {lengths.mean():.1f}, p50/p90/p99 {pct[0]:.0f}/{pct[1]:.0f}/"
          f"{pct[2]:.0f}, max {lengths.max()}; flush {args.flush_rows} rows, bundle "
          f"{args.bundle_rows or args.rows} rows")
    print(f"{'lengths':26} {'budget':>6} {'ladder':>6} {'tails':>5} {'carry':>5} {'efficiency':>10} "
          f"{'shapes':>6} {'used':>5} {'batches':>7}")
    budgets = [int(b) for b in args.budgets.split(",")]
    for (name, cand), budget, ladder, tails, carry in itertools.product(
            CANDIDATE_LENGTHS.items(), budgets, (1, 2), ("pad", "merge"), (False, True)):
        bucketing = Bucketing(lengths=cand, token_budget=budget, ladder=ladder, tails=tails).for_max_length(256)
        real, padded, batches, used = simulate(
            bucketing, lengths, flush_rows=args.flush_rows, bundle_rows=args.bundle_rows, carry=carry)
        print(f"{name:26} {budget:>6} {ladder:>6} {tails:>5} {'yes' if carry else 'no':>5} "
              f"{real / padded:>10.4f} {len(bucketing.shapes()):>6} {len(used):>5} {batches:>7}")


if __name__ == "__main__":
    main()
