"""The Poisson bootstrap in one pass: replicate weights from a hash of (seed, row id, replicate).

Each row enters bootstrap replicate r with an integer weight w ~ Poisson(1) instead of being drawn with
replacement (Hanley & MacGibbon 2006, "Creating non-parametric bootstrap samples using Poisson
frequencies", Comput. Methods Programs Biomed. 83(1); Chamandy, Muralidharan, Najmi & Naidu 2012,
"Estimating uncertainty for massive data streams", Google).  For large N the two agree, and the
Poisson form needs no knowledge of N, so every replicate is accumulated in the same single pass as
the metric itself and merged like it.

The weight is a pure function of (seed, row id, replicate), counter-based as in Salmon et al. 2011
("Parallel random numbers: as easy as 1, 2, 3"): the row id and seed are hashed once with BLAKE2b to a
64-bit key, replicate r's uniform is splitmix64(key + (r + 1) * golden gamma) (Steele, Lea & Flood 2014,
"Fast splittable pseudorandom number generators"; the generator of Java's SplittableRandom), and its top
53 bits become a Poisson(1) count by inverting the CDF.  So the weights, and every interval computed
from them, are identical however the rows are sharded, ordered or batched.

    >>> keys = row_keys(["a", "b", 7], seed=0)          # uint64 [3]
    >>> w = poisson_weights(keys, replicates=1000)       # int64 [3, 1000], mean ~1
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
# Poisson(1) CDF at k = 0..MAX_WEIGHT: P(K <= k) = e^-1 sum_{j<=k} 1/j!.  P(K > 20) < 1e-19 < 2^-53, so
# no 53-bit uniform reaches past it.
MAX_WEIGHT = 20
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(MAX_WEIGHT + 1)])
# A 53-bit uniform integer b gives the weight #{k : b >= THRESHOLDS[k]}: the inverse of the CDF.
# P(K > 20) < 1e-19 < 2^-53, so no 53-bit value reaches past the last threshold.
_THRESHOLDS = np.minimum(np.round(_POISSON1_CDF[:MAX_WEIGHT] * (1 << 53)), (1 << 53) - 1).astype(np.uint64)


def row_key(row_id, seed: int) -> int:
    """A row's 64-bit key: BLAKE2b (8 bytes, keyed by the seed) of the id's text.

    The text of a string id is itself, of any other id its JSON (7 -> "7"), so the id 7 and the id "7"
    weigh the same: a file format that stores ids as text (CSV, or Parquet where one file mixes
    numbers and strings in its id column) does not change the weights.  Raises ValueError for a
    missing (None) id: its weights would be those of every other missing id.
    """
    if row_id is None:
        raise ValueError("the row has no id; bootstrap weights derive from the row id, so every row needs one")
    if hasattr(row_id, "tolist"):  # numpy scalars
        row_id = row_id.tolist()
    text = row_id if isinstance(row_id, str) else json.dumps(row_id, sort_keys=True, default=str, ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=int(seed).to_bytes(16, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


def row_keys(row_ids: Iterable, seed: int) -> np.ndarray:
    """`row_key` of each id: uint64 [N]."""
    return np.fromiter((row_key(i, seed) for i in row_ids), dtype=np.uint64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function (Steele, Lea & Flood 2014) on uint64 array x; wraps modulo 2^64."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def poisson_weights(keys: np.ndarray, replicates: int, *, start: int = 0) -> np.ndarray:
    """Poisson(1) weights of rows `keys` (uint64 [N]) in replicates start..start+replicates-1: int64 [N, R].

    Vectorised: one splitmix64 per (row, replicate) and a search in the Poisson(1) CDF.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    r = np.arange(start + 1, start + replicates + 1, dtype=np.uint64)              # [R]
    with np.errstate(over="ignore"):
        counters = keys.astype(np.uint64)[:, None] + r[None, :] * GOLDEN_GAMMA     # [N, R]
    bits = splitmix64(counters) >> np.uint64(11)                                    # [N, R] 53 random bits
    weights = np.zeros(bits.shape, np.int8)
    for threshold in _THRESHOLDS:  # weight k needs k thresholds passed; stop where none is
        passed = bits >= threshold
        if not passed.any():
            break
        weights += passed
    return weights.astype(np.int64)


def percentile_interval(values: Sequence[float] | np.ndarray, percentiles: Sequence[float] = (2.5, 97.5)) -> list:
    """The bootstrap percentile interval (Efron & Tibshirani 1993, ch. 13) of replicate values.

    numpy's default (linear) percentile; replicates whose value is undefined (NaN, e.g. no row drawn)
    are left out.  Returns [low, high] as floats, or [None, None] when no replicate has a value.
    """
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [None] * len(percentiles)
    return [float(x) for x in np.percentile(v, list(percentiles))]
