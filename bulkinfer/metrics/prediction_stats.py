"""Statistics of a model's predictions over a dataset, as mergeable accumulators (no Beam).

    >>> s = ClassifierStats(num_classes=10); s.add(probs)            # probs [N, 10] float
    >>> s.to_json()["confidence"]["quantiles"]["0.5"]                  # median top probability
    >>> e = EmbedderStats(dim=384); e.add(ids, embeddings)            # ids [N], embeddings [N, 384]
    >>> e.to_json()["cosine_sample"]["mean_pairwise_cosine"]

`ClassifierStats` (a float output of softmax probabilities [C] per row): the predicted class (argmax)
counts, and the confidence (top probability), the margin (top minus second probability) and the entropy
(bits) as KLL quantiles, fixed-bin histograms and exact means.  `EmbedderStats` (a vector [D] per row):
the L2 norm as quantiles, a histogram and an exact mean, each dimension's exact mean and variance, and
the mean pairwise cosine similarity of a deterministic bottom-k sample of rows by id hash.

Rows with a non-finite value are counted (`rows_nonfinite`, which also counts embeddings with a value of
magnitude >= 2**30, beyond `ExactMoments`) and left out of everything else.  Counts,
histograms, means, variances and the sample do not depend on sharding; KLL quantiles agree within the
sketch's stated rank error (see `sketches`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bulkinfer.metrics.sketches import DEFAULT_K, BottomKSample, ExactMoments, Histogram, QuantileSketch

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
BINS = 20  # equal-width bins of the confidence, margin and entropy histograms
ROUNDING = 1e-5  # a probability (or entropy) this far beyond its range is float rounding, not a value out of range
# L2 norms: 0, then quarter-octave bins 2**((i + 0.5) / 4) from 2**-9.875 to 2**9.875, then +inf.  The
# half-step offset puts 1.0 (unit-normalized embeddings) in the middle of a bin, not on an edge.
NORM_EDGES = tuple([0.0] + [2.0 ** ((i + 0.5) / 4) for i in range(-40, 40)] + [float("inf")])
DEFAULT_SAMPLE = 1000


def unit_edges(top: float = 1.0, bins: int = BINS) -> tuple[float, ...]:
    """`bins` equal-width bins over [0, top]."""
    return tuple(float(e) for e in np.linspace(0.0, top, bins + 1))


class _Summary:
    """One scalar per row: KLL quantiles, a fixed-bin histogram and an exact mean and std."""

    def __init__(self, edges: Sequence[float], k: int):
        self.sketch = QuantileSketch(k)
        self.histogram = Histogram(edges)
        self.moments = ExactMoments(1)

    def add(self, values: np.ndarray) -> None:  # [N] finite float64
        self.sketch.add(values)
        self.histogram.add(values)
        self.moments.add(values[:, None])

    def merge(self, other: _Summary) -> None:
        self.sketch.merge(other.sketch)
        self.histogram.merge(other.histogram)
        self.moments.merge(other.moments)

    def to_json(self, ranks: Sequence[float]) -> dict:
        return {"mean": _number(self.moments.mean()[0]), "std": _number(np.sqrt(self.moments.variance()[0])),
                "quantiles": {_rank_key(r): _number(v) for r, v in zip(ranks, self.sketch.quantiles(ranks))},
                "histogram": self.histogram.to_json()}


class ClassifierStats:
    """Predicted classes, confidence, margin and entropy of softmax outputs probs [N, C].

    num_classes: C >= 2.  k: the KLL sketches' accuracy parameter.
    Raises ValueError when a batch's probabilities are not [N, num_classes].
    """

    def __init__(self, num_classes: int, *, k: int = DEFAULT_K):
        if num_classes < 2:
            raise ValueError(f"a classifier's probabilities need at least 2 classes, got {num_classes}")
        self.num_classes, self.k = num_classes, k
        self.rows = 0
        self.rows_nonfinite = 0
        self.class_counts = np.zeros(num_classes, np.int64)
        self.confidence = _Summary(unit_edges(), k)
        self.margin = _Summary(unit_edges(), k)
        self.entropy = _Summary(unit_edges(float(np.log2(num_classes))), k)

    def add(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, np.float64)  # [N, C]
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected probabilities of shape [N, {self.num_classes}], got {probs.shape}")
        finite = np.all(np.isfinite(probs), axis=1)
        self.rows_nonfinite += int(probs.shape[0] - finite.sum())
        probs = probs[finite]
        self.rows += probs.shape[0]
        if not probs.shape[0]:
            return
        self.class_counts += np.bincount(np.argmax(probs, axis=1), minlength=self.num_classes)
        top2 = -np.partition(-probs, 1, axis=1)[:, :2]  # [N, 2]: the largest, then the second largest
        safe = np.where(probs > 0, probs, 1.0)
        entropy = -np.sum(np.where(probs > 0, probs * np.log2(safe), 0.0), axis=1)  # [N] bits
        self.confidence.add(_snap(top2[:, 0], 0.0, 1.0))
        self.margin.add(_snap(top2[:, 0] - top2[:, 1], 0.0, 1.0))
        self.entropy.add(_snap(entropy, 0.0, float(np.log2(self.num_classes))))

    def merge(self, other: ClassifierStats) -> None:
        if (other.num_classes, other.k) != (self.num_classes, self.k):
            raise ValueError(f"cannot merge classifier statistics of {self.num_classes} and {other.num_classes} "
                             "classes (or of different sketch k)")
        self.rows += other.rows
        self.rows_nonfinite += other.rows_nonfinite
        self.class_counts += other.class_counts
        for mine, theirs in ((self.confidence, other.confidence), (self.margin, other.margin),
                             (self.entropy, other.entropy)):
            mine.merge(theirs)

    def to_json(self, ranks: Sequence[float] = QUANTILES) -> dict:
        total = int(self.class_counts.sum())
        return {"num_classes": self.num_classes, "rows": self.rows, "rows_nonfinite": self.rows_nonfinite,
                "class_counts": self.class_counts.tolist(),
                "class_fractions": [c / total if total else None for c in self.class_counts.tolist()],
                "confidence": self.confidence.to_json(ranks), "margin": self.margin.to_json(ranks),
                "entropy_bits": self.entropy.to_json(ranks)}


class EmbedderStats:
    """Norms, per-dimension moments and the mean pairwise cosine of embeddings [N, D].

    sample_size: rows in the bottom-k sample for the mean pairwise cosine (rows with a zero norm, whose
    cosine is undefined, and rows without an id are not sampled).  seed: of the id hash.
    """

    def __init__(self, dim: int, *, k: int = DEFAULT_K, sample_size: int = DEFAULT_SAMPLE, seed: int = 0):
        self.dim, self.k = dim, k
        self.rows = 0
        self.rows_nonfinite = 0
        self.rows_zero_norm = 0
        self.norm = _Summary(NORM_EDGES, k)
        self.moments = ExactMoments(dim)
        self.sample = BottomKSample(sample_size, dim, seed=seed)

    def add(self, ids: Sequence, embeddings: np.ndarray) -> None:
        """ids: [N] row ids (None: not sampled); embeddings [N, D] float."""
        embeddings = np.asarray(embeddings, np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape [N, {self.dim}], got {embeddings.shape}")
        taken = self.moments.add(embeddings)  # [N] bool: rows without a non-finite or huge (>= 2**30) value
        n_taken = int(taken.sum())
        self.rows_nonfinite += embeddings.shape[0] - n_taken
        self.rows += n_taken
        if n_taken < embeddings.shape[0]:
            embeddings, ids = embeddings[taken], [ids[i] for i in np.flatnonzero(taken)]
        norms = np.linalg.norm(embeddings, axis=1)  # [n]
        self.norm.add(norms)
        nonzero = norms > 0
        self.rows_zero_norm += int(n_taken - nonzero.sum())
        if nonzero.all():
            self.sample.add(ids, embeddings)
        else:
            index = np.flatnonzero(nonzero)
            self.sample.add([ids[i] for i in index], embeddings[index])

    def merge(self, other: EmbedderStats) -> None:
        if (other.dim, other.k) != (self.dim, self.k):
            raise ValueError(f"cannot merge embedding statistics of {self.dim} and {other.dim} dimensions "
                             "(or of different sketch k)")
        self.rows += other.rows
        self.rows_nonfinite += other.rows_nonfinite
        self.rows_zero_norm += other.rows_zero_norm
        self.norm.merge(other.norm)
        self.moments.merge(other.moments)
        self.sample.merge(other.sample)

    def to_json(self, ranks: Sequence[float] = QUANTILES) -> dict:
        mean, variance = self.moments.mean(), self.moments.variance()
        m = len(self.sample.keys)
        return {"dim": self.dim, "rows": self.rows, "rows_nonfinite": self.rows_nonfinite,
                "rows_zero_norm": self.rows_zero_norm, "norm": self.norm.to_json(ranks),
                "mean": [_number(v) for v in mean], "variance": [_number(v) for v in variance],
                "mean_vector_norm": _number(np.linalg.norm(mean)) if self.rows else None,
                "total_variance": _number(variance.sum()) if self.rows else None,
                "cosine_sample": {
                    "size": m, "max_size": self.sample.k, "pairs": m * (m - 1) // 2,
                    "method": f"bottom-{self.sample.k} rows by a 64-bit BLAKE2b hash of the row id (seed "
                              f"{self.sample.seed}): the same rows whatever the sharding",
                    "mean_pairwise_cosine": _number(mean_pairwise_cosine(self.sample.vectors)) if m >= 2 else None}}


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    """Mean cosine similarity over the m(m-1)/2 pairs of distinct rows of vectors [m, D] (no zero rows).

    With unit rows u_i: sum over i != j of u_i.u_j = |sum_i u_i|**2 - m, so this costs O(m D).
    """
    v = np.asarray(vectors, np.float64)
    m = v.shape[0]
    if m < 2:
        raise ValueError(f"the mean pairwise cosine needs at least 2 vectors, got {m}")
    units = v / np.linalg.norm(v, axis=1, keepdims=True)  # [m, D]
    total = units.sum(axis=0)  # [D]
    return float((total @ total - m) / (m * (m - 1)))


def _snap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values within ROUNDING outside [low, high] moved onto the bound (float rounding of softmax outputs)."""
    values = np.where((values < low) & (values >= low - ROUNDING), low, values)
    return np.where((values > high) & (values <= high + ROUNDING), high, values)


def _rank_key(rank: float) -> str:
    return f"{rank:g}"


def _number(value) -> float | None:
    """A JSON number, or None for NaN (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


class PredictionStats:
    """The statistics of one group of rows (the whole dataset or one slice): a `ClassifierStats` when
    num_classes is given, an `EmbedderStats` when dim is given, or both.

    Raises ValueError when neither is given.
    """

    def __init__(self, *, num_classes: int | None = None, dim: int | None = None, k: int = DEFAULT_K,
                 sample_size: int = DEFAULT_SAMPLE, seed: int = 0):
        if num_classes is None and dim is None:
            raise ValueError("prediction statistics need probabilities (num_classes) or embeddings (dim)")
        self.rows = 0
        self.classifier = None if num_classes is None else ClassifierStats(num_classes, k=k)
        self.embedder = None if dim is None else EmbedderStats(dim, k=k, sample_size=sample_size, seed=seed)

    def add(self, *, rows: int, probs: np.ndarray | None = None, embeddings: np.ndarray | None = None,
            ids: Sequence | None = None) -> None:
        """One batch of `rows` rows: probs [rows, C], embeddings [rows, D] with their ids [rows]."""
        self.rows += rows
        if self.classifier is not None:
            self.classifier.add(probs)
        if self.embedder is not None:
            self.embedder.add(ids if ids is not None else [None] * rows, embeddings)

    def merge(self, other: PredictionStats) -> None:
        self.rows += other.rows
        for mine, theirs in ((self.classifier, other.classifier), (self.embedder, other.embedder)):
            if (mine is None) != (theirs is None):
                raise ValueError("cannot merge statistics of a classifier with those of an embedder")
            if mine is not None:
                mine.merge(theirs)

    def to_json(self, ranks: Sequence[float] = QUANTILES) -> dict:
        out: dict = {"rows": self.rows}
        if self.classifier is not None:
            out["classifier"] = self.classifier.to_json(ranks)
        if self.embedder is not None:
            out["embedder"] = self.embedder.to_json(ranks)
        return out
