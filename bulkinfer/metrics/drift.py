"""Drift between two distributions given as counts over the same bins: the Jensen-Shannon distance.

    >>> js_distance([10, 0, 5], [8, 2, 5])        # 0 = identical, 1 = disjoint supports

Jensen-Shannon divergence (Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
Theory 37(1), 1991): with M = (P + Q) / 2,

    JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),    KL(P || M) = sum_i p_i log2(p_i / m_i)

in bits (base 2), so 0 <= JSD <= 1.  Its square root is a metric (Endres & Schindelin, IEEE Trans. Inf.
Theory 49(7), 2003): the Jensen-Shannon distance, what `scipy.spatial.distance.jensenshannon(p, q, base=2)`
returns.  Terms with p_i = 0 contribute 0 (the limit of p log p).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two histograms of counts (or probabilities)
    over the same bins; each is normalized to sum 1 first.

    Raises ValueError when the lengths differ, a count is negative or not finite, or either sums to 0.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"the two histograms must have the same bins, got {p.shape[0] if p.ndim else p} "
                         f"and {q.shape[0] if q.ndim else q} bins")
    for name, h in (("first", p), ("second", q)):
        if not np.all(np.isfinite(h)) or np.any(h < 0):
            raise ValueError(f"the {name} histogram has a negative or non-finite count: {h.tolist()}")
        if h.sum() <= 0:
            raise ValueError(f"the {name} histogram is empty (all counts 0); drift needs rows on both sides")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    divergence = (_kl(p, m) + _kl(q, m)) / 2
    return float(np.sqrt(min(max(divergence, 0.0), 1.0)))  # clip float rounding just outside [0, 1]


def _kl(p: np.ndarray, m: np.ndarray) -> float:
    """KL(p || m) in bits, where m > 0 wherever p > 0 (m is p's mixture with another distribution)."""
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / m[nz])))


# The distributions of a stats.json group that drift compares: (name, section, how to get its counts).
DISTRIBUTIONS = (
    ("class_distribution", "classifier", ("class_counts",)),
    ("confidence_histogram", "classifier", ("confidence", "histogram")),
    ("margin_histogram", "classifier", ("margin", "histogram")),
    ("entropy_histogram", "classifier", ("entropy_bits", "histogram")),
    ("norm_histogram", "embedder", ("norm", "histogram")),
)


def stats_drift(current: dict, baseline: dict) -> tuple[dict[str, float], list[str]]:
    """JS distances between the distributions of two groups of `bulkinfer stats` output (see
    `prediction_stats.PredictionStats.to_json`): {name: distance}, and why any other was skipped.

    A histogram's values below and above its edges count as two more bins, so every row takes part.
    Histograms compare only over the same edges, class distributions only over the same classes.
    """
    distances: dict[str, float] = {}
    skipped: list[str] = []
    for name, section, path in DISTRIBUTIONS:
        mine, theirs = current.get(section), baseline.get(section)
        if mine is None and theirs is None:
            continue
        if mine is None or theirs is None:
            skipped.append(f"{name}: only {'the baseline' if mine is None else 'this run'} has a {section} output")
            continue
        a, b = _dig(mine, path), _dig(theirs, path)
        if isinstance(a, dict):  # a histogram
            if a["edges"] != b["edges"]:
                skipped.append(f"{name}: the histograms have different bins")
                continue
            a, b = a["counts"] + [a["below"], a["above"]], b["counts"] + [b["below"], b["above"]]
        elif len(a) != len(b):
            skipped.append(f"{name}: {len(a)} classes here, {len(b)} in the baseline")
            continue
        if not sum(a) or not sum(b):
            skipped.append(f"{name}: no rows {'here' if not sum(a) else 'in the baseline'}")
            continue
        distances[name] = js_distance(a, b)
    return distances, skipped


def _dig(section: dict, path: tuple[str, ...]):
    for key in path:
        section = section[key]
    return section
