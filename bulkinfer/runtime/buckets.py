"""Static shapes: length buckets and token-budget batch sizes.

jit compiles once per input shape, so every batch the engine runs has one of a small, fixed set of
shapes (batch_size, bucket_length).  `plan` sorts rows by length, longest first, and cuts them into
batches of about `token_budget` tokens, each padded to its longest row's bucket.  A bucket's short
tail (too few rows for a full batch) is either padded with masked dummy rows up to the next size on a
short ladder of halvings (`tails="pad"`), or, when that costs fewer padded tokens, filled up with the
next shorter rows, which then ride in the longer bucket (`tails="merge"`, the default).  Nothing ever
creates a shape outside `shapes()`.

Defaults come from `bench/padding.py` on `bulkinfer.testing.synthetic_texts(20000)` with the MiniLM
tokenizer (mean 22 tokens, max 256), flushed 8192 rows at a time like BulkInference: padding
efficiency 0.91 with at most 21 lengths x 2 batch sizes = 42 shapes, 28 of them used (the walking
skeleton's step-8 lengths, 8192 budget and dummy-row tails gave 0.80).  A larger token budget means
fewer, longer-padded tails: 4096 gives 0.89 and 8192 gives 0.87 on 8192-row flushes, so raise
`flush_rows` together with the budget on an accelerator.  See RUNTIME.md for the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Fine buckets where most text lives (short), coarser ones for the long tail: a ~1.2x geometric
# ladder (bucket padding alone costs 7% on the synthetic mix; 8-token steps cost 15%).  The model's max length becomes the last bucket (`for_max_length`).
DEFAULT_LENGTHS = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                   320, 384, 448, 512)

_TAILS = ("pad", "merge")

# Tokens per batch when the user gives none, per JAX platform.  On XLA:CPU a smaller batch keeps a layer's
# activations nearer the cache: 1024 measured faster than 2048 on MiniLM (bench/budget.py, BENCHMARKS.md
# "Token budget on the CPU"); accelerators keep 2048 (not measured here; raise it on a GPU, see above).
ACCELERATOR_TOKEN_BUDGET = 2048
PLATFORM_TOKEN_BUDGET = {"cpu": 1024}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucketing:
    """Which shapes the engine may run.

    lengths: padded sequence lengths, ascending.  Rows longer than the last one are an error (the
      tokenizer truncates to the model's max length, which `for_max_length` makes the last bucket).
    token_budget: target rows x padded length of one batch.
    max_batch: upper bound on rows per batch, whatever the budget.
    ladder: how many halvings of a bucket's full batch size a short batch may use.
    multiple: every batch size is a multiple of this (the number of devices the batch is split over).
    tails: "merge" fills a bucket's short tail with the next shorter rows when that pads fewer tokens
      than dummy rows would; "pad" always pads it with dummy rows.
    """

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    token_budget: int = ACCELERATOR_TOKEN_BUDGET
    max_batch: int = 512
    ladder: int = 1
    multiple: int = 1
    tails: str = "merge"

    def __post_init__(self):
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] < 1:
            raise ValueError(f"lengths must be positive and strictly ascending, got {self.lengths}")
        if self.token_budget < self.lengths[-1]:
            raise ValueError(
                f"token_budget {self.token_budget} is below the longest bucket {self.lengths[-1]}; "
                f"raise token_budget or cap lengths with for_max_length()")
        if self.max_batch < 1 or self.ladder < 0 or self.multiple < 1:
            raise ValueError(
                f"max_batch ({self.max_batch}) and multiple ({self.multiple}) must be >= 1 "
                f"and ladder ({self.ladder}) >= 0")
        if self.tails not in _TAILS:
            raise ValueError(f"tails {self.tails!r} is not supported; expected one of {_TAILS}")

    @classmethod
    def for_platform(cls, platform: str, **settings) -> Bucketing:
        """The default bucketing on a JAX platform ("cpu", "gpu", "tpu"): `PLATFORM_TOKEN_BUDGET` for it
        (1024 on the CPU, 2048 elsewhere) unless settings name a token_budget."""
        settings.setdefault("token_budget", PLATFORM_TOKEN_BUDGET.get(platform, ACCELERATOR_TOKEN_BUDGET))
        return cls(**settings)

    @classmethod
    def for_rows(cls, batch_size: int = 256, ladder: int = 3) -> Bucketing:
        """Batches of rows alone, for inputs without a variable axis: one length (1), so a batch's
        "tokens" are its rows.  Batch sizes are batch_size and `ladder` halvings (256, 128, 64, 32 by
        default); the last batch of a call is padded to the smallest of them that holds it.

        Raises ValueError unless batch_size is a power of two (so that halvings stay integers).
        """
        if batch_size < 1 or batch_size & (batch_size - 1):
            lower = 1 << (max(batch_size, 1).bit_length() - 1)
            raise ValueError(f"batch_size {batch_size} is not a power of two; use {lower} or {2 * lower}")
        return cls(lengths=(1,), token_budget=batch_size, max_batch=batch_size, ladder=ladder)

    def for_max_length(self, max_length: int) -> Bucketing:
        """The same bucketing with lengths capped at max_length (which becomes the last bucket)."""
        lengths = tuple(n for n in self.lengths if n < max_length) + (max_length,)
        return dataclasses.replace(self, lengths=lengths, token_budget=max(self.token_budget, max_length))

    def halved(self) -> Bucketing | None:
        """Half the token budget, for out-of-memory back-off; None if that is below the longest bucket.

        The lengths stay the same, so only batch sizes change (each halving is already on the ladder
        while `ladder >= 1`, so the shapes are usually ones the engine compiled before).
        """
        budget = self.token_budget // 2
        if budget < self.lengths[-1]:
            return None
        return dataclasses.replace(self, token_budget=budget)

    def batch_sizes(self, length: int) -> tuple[int, ...]:
        """Allowed batch sizes for one bucket, largest first: the full size and its halvings."""
        full = max(1, min(self.max_batch, self.token_budget // length))
        full = 1 << (full.bit_length() - 1)  # a power of two, so halvings stay integers
        sizes = [full >> k for k in range(self.ladder + 1) if full >> k >= 1]
        return tuple(sorted({_round_up(s, self.multiple) for s in sizes}, reverse=True))

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch_size, length) the engine may compile, for warm-up."""
        return [(b, n) for n in self.lengths for b in self.batch_sizes(n)]

    def plan(self, lengths: np.ndarray, *, final: bool = True) -> list[tuple[int, int, np.ndarray]]:
        """Cuts rows into batches: a list of (batch_size, bucket_length, row indices).

        final=False leaves out the rows that would need a short (padded) batch, so a caller can carry
        them over to its next call; `carry(lengths)` names them.  Row indices refer to `lengths`.
        """
        batches, _ = self._plan(lengths, final=final)
        return batches

    def packed_rows(self, length: int) -> int:
        """Row slots of a packed batch whose longest row is in the bucket `length`: as many rows of that
        bucket as `token_budget` tokens can hold (each is longer than the bucket below), capped at
        max_batch and so that attention's [rows, length] layout stays within 2 x token_budget positions
        (a coarse ladder, e.g. lengths (512,), would otherwise give it 512 x 512)."""
        k = self.lengths.index(length)
        shortest = self.lengths[k - 1] + 1 if k else 1
        return max(1, min(self.max_batch, self.token_budget // shortest, 2 * self.token_budget // length))

    def packed_tokens(self) -> tuple[int, ...]:
        """Token capacities of packed batches, largest first: the budget and `ladder` halvings of it."""
        return tuple(sorted({max(1, self.token_budget >> k) for k in range(self.ladder + 1)}, reverse=True))

    def packed_shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, length, tokens) a packed plan may use, for warm-up: a batch whose longest row is in
        bucket n holds more tokens than the bucket below n, so smaller capacities are left out."""
        below = dict(zip(self.lengths, (0,) + self.lengths[:-1]))
        return [(self.packed_rows(n), n, t) for n in self.lengths for t in self.packed_tokens() if t > below[n]]

    def pack(self, lengths: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
        """Cuts rows into padding-free batches: a list of (rows, length, tokens, row indices).

        A packed batch lays its rows' tokens end to end, `tokens` of them at most (the size its
        token-wise layers compute, `token_budget` or a halving for the last batch), and holds at most
        `rows` rows, none longer than `length` (the [rows, length] layout attention uses).  Rows go
        longest first; a batch that has no room for the next longest row is topped up with the
        shortest rows, so every batch but the last is nearly full.  Row indices refer to `lengths`.
        Raises ValueError for a row longer than the last bucket.
        """
        lengths = self._checked(lengths)
        order = np.argsort(-lengths, kind="stable")  # [N] longest first
        size = lengths[order].tolist()
        bucket = np.asarray(self.lengths)[np.searchsorted(self.lengths, lengths[order])].tolist()
        budget, capacities = self.token_budget, self.packed_tokens()
        batches, lo, hi = [], 0, len(order)
        while lo < hi:
            length = bucket[lo]
            cap = self.packed_rows(length)
            take, used = [lo], size[lo]
            lo += 1
            while lo < hi and len(take) < cap and used + size[lo] <= budget:  # the next longest
                take.append(lo)
                used += size[lo]
                lo += 1
            while lo < hi and len(take) < cap and used + size[hi - 1] <= budget:  # top up with the shortest
                hi -= 1
                take.append(hi)
                used += size[hi]
            tokens = min((t for t in capacities if t >= used), default=budget)
            batches.append((cap, length, tokens, order[take]))
        return batches

    def carry(self, lengths: np.ndarray) -> np.ndarray:
        """The rows `plan(lengths, final=False)` leaves out, to run with later rows."""
        _, rest = self._plan(lengths, final=False)
        return rest

    def _checked(self, lengths) -> np.ndarray:
        lengths = np.asarray(lengths)
        if lengths.size and lengths.max() > self.lengths[-1]:
            row = int(np.argmax(lengths))
            raise ValueError(f"row {row} has {lengths[row]} tokens; the longest bucket is {self.lengths[-1]}; "
                             f"truncate it or add a longer bucket")
        return lengths

    def _plan(self, lengths, *, final: bool):
        lengths = self._checked(lengths)
        order = np.argsort(-lengths, kind="stable")  # [N] longest first
        bucket_of = np.searchsorted(self.lengths, lengths[order])  # [N] bucket index per sorted row
        pad_len = np.asarray(self.lengths)[bucket_of]  # [N] each row's own padded length
        # For each sorted position, where its bucket's rows end (rows are grouped by bucket).
        bucket_end = np.searchsorted(-bucket_of, -bucket_of, side="right")
        batches, rest = [], []
        i, n = 0, len(order)
        while i < n:
            length = int(pad_len[i])
            sizes = self.batch_sizes(length)
            full = sizes[0]
            end = int(bucket_end[i])
            if end - i >= full:  # a full batch of this bucket alone
                batches.append((full, length, order[i : i + full]))
                i += full
                continue
            short = end - i  # this bucket's tail: fewer rows than a full batch
            padded = min(s for s in sizes if s >= short)
            if self.tails == "merge" and end < n:
                # Filling the batch with the next shorter rows costs full*length padded tokens, and
                # saves what those rows would have cost in their own buckets.
                take = min(full, n - i)
                saved = int(pad_len[end : i + take].sum())
                pad_cost = padded * length
                merge_cost = min(s for s in sizes if s >= take) * length - saved
                if merge_cost < pad_cost:
                    if take < full and not final:
                        rest.append(order[i:])
                        break
                    size = min(s for s in sizes if s >= take)
                    batches.append((size, length, order[i : i + take]))
                    i += take
                    continue
            if not final:
                rest.append(order[i:end])
            else:
                batches.append((padded, length, order[i:end]))
            i = end
        rest = np.concatenate(rest) if rest else np.zeros(0, np.int64)
        return batches, rest


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
