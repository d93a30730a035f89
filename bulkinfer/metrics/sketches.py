"""Mergeable sketches over a stream of rows: quantiles, fixed-bin histograms, exact moments, a hash sample.

    >>> q = QuantileSketch(k=200); q.add(np.random.rand(10_000))
    >>> other = QuantileSketch(k=200); other.add(np.random.rand(5_000)); q.merge(other)
    >>> q.quantiles([0.5])            # within q.rank_error (normalized rank, 99% confidence) of the median
    >>> h = Histogram(np.linspace(0, 1, 21)); h.add(np.random.rand(100)); h.counts   # [20] int64

Every class has `add` (one batch's values), `merge` (another of the same settings, in place) and read-outs,
and pickles to a compact state, so a Beam `CombineFn` can hold it as its accumulator.

Which results depend on how the rows were split into batches, files and workers:
- `Histogram` counts, `ExactMoments` (integer sums) and `BottomKSample` (a deterministic choice by id hash)
  do not: any sharding and merge order gives identical numbers.
- `QuantileSketch` (KLL) does, within its stated error: KLL compacts by random coin flips, so two runs
  agree only to within `rank_error` of the exact rank, as any KLL sketch does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

DEFAULT_K = 200  # KLL's default: normalized rank error ~1.33% (single quantile, 99% confidence)


class QuantileSketch:
    """Approximate quantiles of a stream of floats: Apache DataSketches' KLL sketch (`kll_floats_sketch`).

    Karnin, Lang & Liberty, "Optimal Quantile Approximation in Streams" (FOCS 2016); the library is
    https://datasketches.apache.org (Python package `datasketches`).  The state is the serialized sketch
    (a few KB whatever the row count), so it pickles.

    k: the sketch's accuracy parameter (8..65535); its normalized rank error is `rank_error`.
    Values that are not finite are not added (NaN and +-inf carry no rank); `add` returns how many it dropped.
    """

    def __init__(self, k: int = DEFAULT_K):
        from datasketches import kll_floats_sketch

        if not 8 <= k <= 65535:
            raise ValueError(f"KLL k must be in 8..65535, got {k}; 200 (the default) gives ~1.3% rank error")
        self.k = k
        self._sketch = kll_floats_sketch(k)

    def add(self, values: np.ndarray) -> int:
        """Adds [N] values; returns the number of non-finite values left out."""
        values = np.asarray(values, np.float32).ravel()
        finite = np.isfinite(values)
        self._sketch.update(values[finite])
        return int(values.size - finite.sum())

    def merge(self, other: QuantileSketch) -> None:
        if other.k != self.k:
            raise ValueError(f"cannot merge KLL sketches of k={self.k} and k={other.k}; use one k for every part")
        self._sketch.merge(other._sketch)

    @property
    def n(self) -> int:
        """Values added (over every merged part)."""
        return int(self._sketch.n)

    @property
    def rank_error(self) -> float:
        """A-priori normalized rank error of one quantile query (99% confidence), e.g. 0.0133 for k=200."""
        from datasketches import kll_floats_sketch

        return float(kll_floats_sketch.get_normalized_rank_error(self.k, False))

    def quantiles(self, ranks: Sequence[float]) -> list[float | None]:
        """The values at normalized ranks in [0, 1] (None each when nothing was added)."""
        if self._sketch.is_empty():
            return [None for _ in ranks]
        return [float(v) for v in self._sketch.get_quantiles(list(ranks))]

    def __getstate__(self) -> dict:
        return {"k": self.k, "sketch": self._sketch.serialize()}

    def __setstate__(self, state: dict) -> None:
        from datasketches import kll_floats_sketch

        self.k = state["k"]
        self._sketch = kll_floats_sketch.deserialize(state["sketch"])


class Histogram:
    """Counts of values in fixed bins: `edges` [B + 1] increasing -> `counts` [B] int64.

    Bin i holds edges[i] <= x < edges[i + 1]; the last bin also holds x == edges[-1].  Values below
    edges[0] or above edges[-1] are counted in `below` / `above`, and NaN in `nonfinite`, so that
    every added value is counted somewhere.  Edges may be +-inf.
    """

    def __init__(self, edges: Sequence[float]):
        edges = np.asarray(edges, np.float64)
        if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError(f"histogram edges must be at least 2 strictly increasing numbers, got {edges.tolist()}")
        self.edges = edges
        self.counts = np.zeros(edges.size - 1, np.int64)
        self.below = self.above = self.nonfinite = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64).ravel()
        nan = np.isnan(values)
        values = values[~nan]
        self.nonfinite += int(nan.sum())
        low, high = values < self.edges[0], values > self.edges[-1]
        self.below += int(low.sum())
        self.above += int(high.sum())
        inside = values[~(low | high)]
        index = np.minimum(np.searchsorted(self.edges, inside, side="right") - 1, self.counts.size - 1)
        self.counts += np.bincount(index, minlength=self.counts.size)

    def merge(self, other: Histogram) -> None:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge histograms with different edges")
        self.counts += other.counts
        self.below += other.below
        self.above += other.above
        self.nonfinite += other.nonfinite

    @property
    def total(self) -> int:
        """Values inside the edges (the counts' sum)."""
        return int(self.counts.sum())

    def to_json(self) -> dict:
        return {"edges": [float(e) if np.isfinite(e) else str(e) for e in self.edges],
                "counts": self.counts.tolist(), "below": self.below, "above": self.above}


class ExactMoments:
    """Count, mean and variance of each of D columns, from exact integer sums (any merge order, same bits).

    Each value is rounded to a multiple of 2**-32 (fixed point) and sum x and sum x**2 are kept as
    Python integers, so adding and merging are exact and associative.  The mean and the variance are
    then computed once from the exact sums: variance = (n * S2 - S1**2) / n**2, with no cancellation,
    since the subtraction is of integers.  This is the exact counterpart of Chan, Golub & LeVeque's
    pairwise update ("Updating formulae and a pairwise algorithm for computing sample variances", 1979),
    whose floating-point merges depend on their order, hence on the sharding.

    A row with a non-finite value, or one of magnitude >= 2**30, is left out of the sums and counted in
    `rejected` (its fixed-point square would not fit the integer limbs this class sums with numpy).
    """

    SCALE_BITS = 32  # values are multiples of 2**-32
    LIMIT = 2.0 ** 30  # |x| below this: |x| * 2**32 < 2**62 fits int64
    _LIMB = 21  # three 21-bit limbs hold a 63-bit integer; limb products (< 2**42) sum in int64
    _ROWS = 1 << 20  # rows summed at once: 2**20 products of < 2**42 stay below 2**63

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"ExactMoments needs at least one column, got dim={dim}")
        self.dim = dim
        self.n = 0
        self.rejected = 0
        self.s1 = np.zeros(dim, object)  # sum of round(x * 2**32), Python ints
        self.s2 = np.zeros(dim, object)  # sum of round(x * 2**32) ** 2, Python ints
        self.s1[:] = 0
        self.s2[:] = 0

    def add(self, x: np.ndarray) -> np.ndarray:
        """Adds rows x [N, D] (any float dtype); returns the [N] bool mask of rows taken."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} values, got an array of shape {x.shape}")
        ok = np.all(np.isfinite(x) & (np.abs(x) < self.LIMIT), axis=1)
        self.rejected += int(x.shape[0] - ok.sum())
        taken = x if ok.all() else x[ok]
        for start in range(0, taken.shape[0], self._ROWS):
            self._add_exact(taken[start:start + self._ROWS])
        return ok

    def _add_exact(self, x: np.ndarray) -> None:
        q = np.rint(x * float(1 << self.SCALE_BITS)).astype(np.int64)  # [N, D], |q| < 2**62 (scaling is exact)
        # Two's-complement limbs: q = sum_i l_i * 2**(21 i), the lower limbs in [0, 2**21), the top one signed.
        # Values below 2**9 (nearly all) need two limbs; larger ones three.
        mask = (1 << self._LIMB) - 1
        if np.abs(x).max(initial=0.0) < 2.0 ** (2 * self._LIMB - 1 - self.SCALE_BITS):
            limbs = [q & mask, q >> self._LIMB]
        else:
            limbs = [q & mask, (q >> self._LIMB) & mask, q >> (2 * self._LIMB)]
        # Each limb product is below 2**42 in magnitude, so 2**20 rows of them sum exactly in int64.
        total1 = sum(_as_ints(limb.sum(axis=0)) * (1 << (self._LIMB * i)) for i, limb in enumerate(limbs))
        total2 = sum(_as_ints(np.einsum("nd,nd->d", limbs[i], limbs[j])) * ((2 if i < j else 1) << (self._LIMB * (i + j)))
                     for i in range(len(limbs)) for j in range(i, len(limbs)))
        self.s1 = self.s1 + total1
        self.s2 = self.s2 + total2
        self.n += x.shape[0]

    def merge(self, other: ExactMoments) -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of {self.dim} and {other.dim} columns")
        self.n += other.n
        self.rejected += other.rejected
        self.s1 = self.s1 + other.s1
        self.s2 = self.s2 + other.s2

    def mean(self) -> np.ndarray:
        """[D] float64 means (NaN when no row was taken)."""
        if self.n == 0:
            return np.full(self.dim, np.nan)
        return np.array([s / self.n / 2 ** self.SCALE_BITS for s in self.s1], np.float64)

    def variance(self) -> np.ndarray:
        """[D] float64 population variances, 1/n sum (x - mean)**2 (NaN when no row was taken)."""
        if self.n == 0:
            return np.full(self.dim, np.nan)
        n = self.n
        return np.array([(n * s2 - s1 * s1) / (n * n) / 2 ** (2 * self.SCALE_BITS)
                         for s1, s2 in zip(self.s1, self.s2)], np.float64)


def _as_ints(column: np.ndarray) -> np.ndarray:
    """[D] int64 -> [D] object array of Python ints (which never overflow)."""
    out = np.empty(column.shape[0], object)
    out[:] = column.tolist()
    return out


def id_hash(row_id, seed: int = 0) -> int:
    """A 64-bit hash of a row id's text (BLAKE2b, keyed by the seed): the same on every worker and run.

    A string is its own text and anything else its JSON text, so the id 7 and the id "7" hash alike:
    Parquet stores a column of mixed integer and text ids as text, and a file's storage must not change
    which rows are sampled.
    """
    return _hash_text(_id_text(row_id), seed.to_bytes(8, "little", signed=True))  # == unsigned for seeds >= 0


def _hash_text(text: str, key: bytes) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key)
    return int.from_bytes(digest.digest(), "little")


class BottomKSample:
    """A uniform sample of at most k rows that does not depend on sharding: those with the k smallest
    `id_hash` values (bottom-k sampling; Cohen & Kaplan, "Summarizing data using bottom-k sketches", 2007).

    Every part keeps its own k smallest, and the union's k smallest are those of the whole stream, so any
    split and merge order gives the same rows.  Ties of the 64-bit hash are broken by the id's text and
    then the vector's bytes (so a repeated id, or ids 7 and "7", are ordered the same way everywhere).
    Rows without an id (None) are not sampled and are counted in `skipped`.
    """

    def __init__(self, k: int, dim: int, *, seed: int = 0):
        if k < 2:
            raise ValueError(f"the sample needs at least 2 rows to compare, got k={k}")
        self.k, self.dim, self.seed = k, dim, seed
        self.skipped = 0
        self.keys: list[tuple[int, str]] = []  # (hash, id text), sorted
        self.vectors = np.zeros((0, dim), np.float32)  # [m, D], in the order of keys

    def add(self, ids: Sequence, vectors: np.ndarray) -> None:
        """ids: [N] row ids; vectors [N, D]."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} vectors of {self.dim} values, got shape {vectors.shape}")
        seed = self.seed.to_bytes(8, "little", signed=True)  # == unsigned for seeds >= 0
        limit = self.keys[-1] if len(self.keys) == self.k else None  # a full sample takes only smaller keys
        keep, keys = [], []
        for i, row_id in enumerate(ids):
            if row_id is None:
                self.skipped += 1
                continue
            text = _id_text(row_id)
            key = (_hash_text(text, seed), text)
            if limit is None or key <= limit:
                keep.append(i)
                keys.append(key)
        if keep:
            self._keep_smallest(self.keys + keys, np.concatenate([self.vectors, vectors[keep]]))

    def merge(self, other: BottomKSample) -> None:
        if (other.k, other.dim, other.seed) != (self.k, self.dim, self.seed):
            raise ValueError("cannot merge samples of different size, width or seed")
        self.skipped += other.skipped
        self._keep_smallest(self.keys + other.keys, np.concatenate([self.vectors, other.vectors]))

    def _keep_smallest(self, keys: list[tuple[int, str]], vectors: np.ndarray) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if any(keys[a] == keys[b] for a, b in zip(order, order[1:])):  # a repeated id: order by the vectors too
            order = sorted(order, key=lambda i: (keys[i], vectors[i].tobytes()))
        order = order[:self.k]
        self.keys = [keys[i] for i in order]
        self.vectors = vectors[order]


def _id_text(row_id) -> str:
    """A string as it is; anything else as its JSON text (numpy scalars as their Python value)."""
    if isinstance(row_id, str):
        return row_id
    if hasattr(row_id, "item"):
        row_id = row_id.item()
    return json.dumps(row_id, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
