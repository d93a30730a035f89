"""Static shapes: length buckets and token-budget batch sizes.

jit compiles once per input shape, so every batch the engine runs has one of a small, fixed set of
shapes (batch_size, bucket_length).  Rows are sorted by length, each padded up to its bucket, and cut
into batches of about `token_budget` tokens; a final short batch is padded with masked dummy rows up
to the next size on a short ladder of batch sizes, never to a new shape.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Fine buckets where most text lives (short), coarser ones for the long tail.  Chosen for padding
# efficiency >= 0.9 on a realistic length mix (see bench/); capped at the model's max length.
DEFAULT_LENGTHS = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 448, 512)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucketing:
    """Which shapes the engine may run.

    lengths: padded sequence lengths, ascending.  Rows longer than the last one are an error (the
      tokenizer truncates to the model's max length, which `for_max_length` makes the last bucket).
    token_budget: target rows x padded length of one batch.
    max_batch: upper bound on rows per batch, whatever the budget.
    ladder: how many halvings of a bucket's full batch size a final short batch may use.
    multiple: every batch size is a multiple of this (the number of devices the batch is split over).
    """

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    token_budget: int = 8192
    max_batch: int = 512
    ladder: int = 4
    multiple: int = 1

    def __post_init__(self):
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] < 1:
            raise ValueError(f"lengths must be positive and strictly ascending, got {self.lengths}")
        if self.token_budget < self.lengths[-1]:
            raise ValueError(f"token_budget {self.token_budget} is below the longest bucket {self.lengths[-1]}")
        if self.max_batch < 1 or self.ladder < 0 or self.multiple < 1:
            raise ValueError("max_batch and multiple must be >= 1 and ladder >= 0")

    def for_max_length(self, max_length: int) -> Bucketing:
        """The same bucketing with lengths capped at max_length (which becomes the last bucket)."""
        lengths = tuple(n for n in self.lengths if n < max_length) + (max_length,)
        return dataclasses.replace(self, lengths=lengths, token_budget=max(self.token_budget, max_length))

    def bucket_length(self, n: int) -> int:
        i = int(np.searchsorted(self.lengths, n))
        if i == len(self.lengths):
            raise ValueError(f"a row of {n} tokens exceeds the longest bucket {self.lengths[-1]}")
        return self.lengths[i]

    def batch_sizes(self, length: int) -> tuple[int, ...]:
        """Allowed batch sizes for one bucket, largest first: the full size and its halvings."""
        full = max(1, min(self.max_batch, self.token_budget // length))
        full = 1 << (full.bit_length() - 1)  # a power of two, so halvings stay integers
        sizes = [full >> k for k in range(self.ladder + 1) if full >> k >= 1]
        return tuple(sorted({_round_up(s, self.multiple) for s in sizes}, reverse=True))

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch_size, length) the engine may compile, for warm-up."""
        return [(b, n) for n in self.lengths for b in self.batch_sizes(n)]

    def plan(self, lengths: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Cuts rows into batches: a list of (batch_size, bucket_length, row indices)."""
        lengths = np.asarray(lengths)
        if lengths.size and lengths.max() > self.lengths[-1]:
            row = int(np.argmax(lengths))
            raise ValueError(f"row {row} has {lengths[row]} tokens; the longest bucket is {self.lengths[-1]}")
        order = np.argsort(lengths, kind="stable")
        bucket_of = np.searchsorted(self.lengths, lengths[order])  # [N] bucket index per sorted row
        batches = []
        for b in np.unique(bucket_of):
            rows = order[bucket_of == b]
            length = self.lengths[b]
            sizes = self.batch_sizes(length)
            full = sizes[0]
            for start in range(0, len(rows), full):
                chunk = rows[start : start + full]
                size = min(s for s in sizes if s >= len(chunk))
                batches.append((size, length, chunk))
        return batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
