"""Classification metrics from mergeable integer counts: accuracy, macro F1, log loss, Brier, ECE.

    >>> counts = ClassificationCounts(num_classes=3)
    >>> counts.add(np.array([0, 2]), np.array([[.8, .1, .1], [.2, .2, .6]], np.float32))
    >>> counts.merge([other_counts]).metrics()["accuracy"]

State (fixed size, `replicates` R rows deep, R = 1 without the bootstrap):
    confusion   int64 [R, C, C]   rows = true label, columns = predicted (argmax of probs)
    log_loss    int   [R]         sum of -log(clip(p_true, eps, 1 - eps)), fixed point
    brier       int   [R]         sum of sum_c (p_c - onehot_c)^2, fixed point
    bin_count   int64 [R, 15]     rows per top-label confidence bin
    bin_correct int64 [R, 15]     correctly classified rows per bin
    bin_conf    int   [R, 15]     sum of the top-label confidence per bin, fixed point
Every sum is an integer: counts, and real values in fixed point (round(x * 2^32), summed as Python
ints, which never overflow).  Integer addition is associative, so merging in any order, over any
sharding, gives bit-identical state and so identical metrics.  The rounding costs < 2^-33 per row.
With replicates, a batch is added as one matrix product per 8192 rows, weights [R, m] @ per-row features [m, K], in
float64 on exact integers small enough (< 2^19, fixed-point values in two parts) that every sum is exact.

Definitions (those of scikit-learn 1.9, which the tests check value for value):
- accuracy: `accuracy_score`.
- macro_f1: `f1_score(average="macro", zero_division=0)`: the mean F1 over the classes that occur as a
  true or a predicted label; per_class: `precision_recall_fscore_support(labels=range(C), zero_division=0)`.
- log_loss: `log_loss(labels=range(C))`: p_true clipped to [eps, 1 - eps], eps the machine epsilon of
  the probabilities' dtype (float32: 1.19e-7), natural log, mean over rows.
- brier: `brier_score_loss(labels=range(C), scale_by_half=False)`: mean over rows of
  sum_c (p_c - onehot_c)^2, in [0, 2] (scikit-learn's default halves it for two classes only).
- ece: expected calibration error with 15 equal-width bins of the top-label confidence
  (Guo, Pleiss, Sun & Weinberger 2017, "On calibration of modern neural networks", eq. 3): bin m holds
  confidences in ((m-1)/15, m/15]; ECE = sum_m |correct_m - sum of confidences_m| / N.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ECE_BINS = 15
SCALE = 1 << 32                  # fixed point: a real x is summed as round(x * SCALE)
CHUNK_ROWS = 1024                # rows per bincount, so that every float64 partial sum stays an exact integer
MAX_STATE = 50_000_000           # R * C * C cells at most (400 MB)
MAX_WEIGHT = 20                  # a row's weight in a replicate (Poisson(1) draws stop there)
SPLIT = 19                       # fixed-point values (< 2^38) are summed as two parts below 2^19
MATMUL_ROWS = 8192               # rows per matmul: sums <= MAX_WEIGHT * 2^19 * 8192 < 2^53, exact in float64
MATMUL_CELLS = 1024              # confusion matrices up to this many cells go through the matmul, larger ones bincount
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "log_loss": False, "brier": False, "ece": False}
HEADLINE = tuple(HIGHER_IS_BETTER)


def _fixed(x: np.ndarray) -> np.ndarray:
    """Reals to fixed-point int64 (|x| < 2^30)."""
    return np.rint(np.asarray(x, np.float64) * SCALE).astype(np.int64)


def row_terms(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row quantities for labels int [N] in 0..C-1 and probs float [N, C] (each row sums to ~1).

    Returns {"cell": int64 [N] (true * C + predicted), "bin": int64 [N] (0..14), "correct": int64 [N],
    "log_loss", "brier", "conf": int64 [N] fixed point}.  The predicted class is argmax(probs), the
    first on ties, as numpy and jax.numpy break them.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs)
    n, c = probs.shape
    pred = np.argmax(probs, axis=1)
    p_true = probs[np.arange(n), labels]
    eps = np.finfo(probs.dtype).eps if np.issubdtype(probs.dtype, np.floating) else np.finfo(np.float64).eps
    clipped = np.clip(p_true, eps, 1 - eps).astype(np.float64)  # clipped in the probabilities' dtype, as sklearn
    p64 = probs.astype(np.float64)
    brier = (p64 ** 2).sum(axis=1) - 2 * p64[np.arange(n), labels] + 1.0
    conf = p64[np.arange(n), pred]
    # bin m (0-based) holds ((m)/15, (m+1)/15]; a confidence of 0 joins the first bin.
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    return {"cell": labels * c + pred, "bin": bins, "correct": (pred == labels).astype(np.int64),
            "log_loss": _fixed(-np.log(clipped)), "brier": _fixed(brier), "conf": _fixed(conf)}


def _weighted_sums(weights: np.ndarray, keys: np.ndarray, size: int, values: np.ndarray | None = None) -> np.ndarray:
    """sum_i weights[i, r] * values[i] for each replicate r and key k = keys[i]: int64 [R, size].

    weights int64 [N, R]; keys int64 [N] in 0..size-1; values int64 [N] (default 1).  bincount adds in
    float64: each chunk's partial sums stay below 2^53 (values < 2^38, weights <= 20, 1024 rows), so
    they are exact integers.
    """
    n, r = weights.shape
    out = np.zeros(r * size, np.int64)
    offsets = np.arange(r, dtype=np.int64) * size                                   # [R]
    for s in range(0, n, CHUNK_ROWS):
        w = weights[s:s + CHUNK_ROWS]                                               # [n', R]
        k = keys[s:s + CHUNK_ROWS, None] + offsets[None, :]                          # [n', R]
        v = w if values is None else w * values[s:s + CHUNK_ROWS, None]
        out += np.rint(np.bincount(k.ravel(), weights=v.ravel().astype(np.float64), minlength=r * size)).astype(
            np.int64)
    return out.reshape(r, size)


def _as_python_ints(a: np.ndarray) -> np.ndarray:
    return a.astype(object)


def _width(c: int) -> int:
    """Feature columns of `_features`: C*C one-hot cells (0 if counted apart), then 4 x 15 bin columns, 4 sums."""
    return c * c + 4 * ECE_BINS + 4


def _features(t: dict, rows: slice, c: int) -> np.ndarray:
    """float64 [m, K] per-row features whose weighted column sums are the state, every entry an integer
    below 2^SPLIT: one-hot confusion cell (when c > 0), one-hot bin, bin x correct, bin x confidence
    (high and low parts), log loss and Brier (high and low parts)."""
    bins = t["bin"][rows]
    m = len(bins)
    f = np.zeros((m, _width(c)), np.float64)
    at = np.arange(m)
    k = c * c
    if c:
        f[at, t["cell"][rows]] = 1
    b = ECE_BINS
    conf_hi, conf_lo = _split(t["conf"][rows])
    f[at, k + bins] = 1
    f[at, k + b + bins] = t["correct"][rows]
    f[at, k + 2 * b + bins] = conf_hi
    f[at, k + 3 * b + bins] = conf_lo
    f[:, k + 4 * b], f[:, k + 4 * b + 1] = _split(t["log_loss"][rows])
    f[:, k + 4 * b + 2], f[:, k + 4 * b + 3] = _split(t["brier"][rows])
    return f


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point int64 x (0 <= x < 2^(2 SPLIT)) -> (x >> SPLIT, x & (2^SPLIT - 1))."""
    return x >> SPLIT, x & ((1 << SPLIT) - 1)


def _join(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Sums of the parts of `_split` -> the sums as Python ints (never overflowing)."""
    return _as_python_ints(hi) * (1 << SPLIT) + _as_python_ints(lo)


@dataclasses.dataclass
class ClassificationCounts:
    """The mergeable state of the module docstring, for `num_classes` classes and `replicates` replicates.

    Without the bootstrap (replicates=1) every row weighs 1; with it, `add` takes the rows' weights.
    Raises ValueError when replicates * C * C exceeds MAX_STATE (fewer replicates, or evaluate fewer classes).
    """

    num_classes: int
    replicates: int = 1
    confusion: np.ndarray = None
    log_loss: np.ndarray = None
    brier: np.ndarray = None
    bin_count: np.ndarray = None
    bin_correct: np.ndarray = None
    bin_conf: np.ndarray = None

    def __post_init__(self):
        c, r = self.num_classes, self.replicates
        if c < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={c}")
        if r < 1 or r * c * c > MAX_STATE:
            raise ValueError(f"{r} replicates of a {c}x{c} confusion matrix is {r * c * c} counts; keep replicates "
                             f"* classes^2 <= {MAX_STATE} (e.g. --bootstrap {max(1, MAX_STATE // (c * c))})")
        if self.confusion is None:
            self.confusion = np.zeros((r, c, c), np.int64)
            self.bin_count = np.zeros((r, ECE_BINS), np.int64)
            self.bin_correct = np.zeros((r, ECE_BINS), np.int64)
            self.log_loss = _as_python_ints(np.zeros(r, np.int64))
            self.brier = _as_python_ints(np.zeros(r, np.int64))
            self.bin_conf = _as_python_ints(np.zeros((r, ECE_BINS), np.int64))

    def add(self, labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> ClassificationCounts:
        """Adds rows: labels int [N] in 0..C-1, probs float [N, C], weights int64 [N, R] (default: all 1).

        Returns self.  Labels and probabilities are not checked here (the Beam stage makes bad rows dead letters).
        """
        n = len(labels)
        if n == 0:
            return self
        c, r = self.num_classes, self.replicates
        if weights is None:
            weights = np.ones((n, r), np.int64)
        if weights.shape != (n, r) or (weights.size and (weights.min() < 0 or weights.max() > MAX_WEIGHT)):
            raise ValueError(f"weights must be int [{n}, {r}] in 0..{MAX_WEIGHT}, got shape {list(weights.shape)}")
        t = row_terms(labels, probs)
        if r == 1:  # one replicate: bincounts, no feature matrix
            self.confusion += _weighted_sums(weights, t["cell"], c * c).reshape(r, c, c)
            self.bin_count += _weighted_sums(weights, t["bin"], ECE_BINS)
            self.bin_correct += _weighted_sums(weights, t["bin"], ECE_BINS, t["correct"])
            zero = np.zeros(n, np.int64)
            self.log_loss = self.log_loss + _as_python_ints(_weighted_sums(weights, zero, 1, t["log_loss"])[:, 0])
            self.brier = self.brier + _as_python_ints(_weighted_sums(weights, zero, 1, t["brier"])[:, 0])
            self.bin_conf = self.bin_conf + _as_python_ints(_weighted_sums(weights, t["bin"], ECE_BINS, t["conf"]))
            return self
        matmul_cells = c * c <= MATMUL_CELLS
        totals = np.zeros((r, _width(c if matmul_cells else 0)), np.int64)
        for s in range(0, n, MATMUL_ROWS):
            rows = slice(s, s + MATMUL_ROWS)
            f = _features(t, rows, c if matmul_cells else 0)                        # [m, K] exact integers
            # [R, m] @ [m, K]: every product and partial sum is an integer below 2^53, so float64 is exact.
            totals += np.rint(weights[rows].T.astype(np.float64) @ f).astype(np.int64)
        b = ECE_BINS
        k = c * c if matmul_cells else 0
        if matmul_cells:
            self.confusion += totals[:, :k].reshape(r, c, c)
        else:
            self.confusion += _weighted_sums(weights, t["cell"], c * c).reshape(r, c, c)
        self.bin_count += totals[:, k:k + b]
        self.bin_correct += totals[:, k + b:k + 2 * b]
        self.bin_conf = self.bin_conf + _join(totals[:, k + 2 * b:k + 3 * b], totals[:, k + 3 * b:k + 4 * b])
        self.log_loss = self.log_loss + _join(totals[:, k + 4 * b], totals[:, k + 4 * b + 1])
        self.brier = self.brier + _join(totals[:, k + 4 * b + 2], totals[:, k + 4 * b + 3])
        return self

    def merge(self, others) -> ClassificationCounts:
        """Adds the counts of `others` (same num_classes and replicates) into self; returns self."""
        for o in others:
            if (o.num_classes, o.replicates) != (self.num_classes, self.replicates):
                raise ValueError(f"cannot merge counts of {o.num_classes} classes x {o.replicates} replicates into "
                                 f"{self.num_classes} x {self.replicates}")
            self.confusion += o.confusion
            self.bin_count += o.bin_count
            self.bin_correct += o.bin_correct
            self.log_loss = self.log_loss + o.log_loss
            self.brier = self.brier + o.brier
            self.bin_conf = self.bin_conf + o.bin_conf
        return self

    def rows(self, r: int = 0) -> int:
        """Rows counted (their total weight) in replicate r."""
        return int(self.confusion[r].sum())

    def metrics(self, r: int = 0) -> dict:
        """The metrics of replicate r (r = 0 without the bootstrap); see the module docstring.

        Returns {"rows", "accuracy", "macro_f1", "log_loss", "brier", "ece", "confusion_matrix" (list of
        lists, rows = true label), "per_class": {"precision", "recall", "f1", "support"} (lists over
        classes)}; the rates are NaN when no row was counted.
        """
        h = self.headline(r)
        cm = self.confusion[r]
        precision, recall, f1, support = _per_class(cm)
        return {"rows": self.rows(r), **h, "confusion_matrix": cm.tolist(),
                "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                              "support": support.tolist()}}

    def headline(self, r: int = 0) -> dict[str, float]:
        """accuracy, macro_f1, log_loss, brier and ece of replicate r (NaN when it counts no row)."""
        cm = self.confusion[r]
        n = int(cm.sum())
        if n == 0:
            return {k: float("nan") for k in HEADLINE}
        _, _, f1, _ = _per_class(cm)
        present = (cm.sum(0) + cm.sum(1)) > 0
        gap = sum(abs(int(correct) * SCALE - int(conf))
                  for correct, conf in zip(self.bin_correct[r].tolist(), self.bin_conf[r].tolist()))
        return {"accuracy": float(np.trace(cm)) / n,
                "macro_f1": float(f1[present].mean()),
                "log_loss": int(self.log_loss[r]) / SCALE / n,
                "brier": int(self.brier[r]) / SCALE / n,
                "ece": gap / SCALE / n}

    def calibration(self, r: int = 0) -> dict:
        """The 15 bins behind ECE: {"edges": [16], "count", "correct", "confidence_sum"} (lists over bins)."""
        return {"edges": np.linspace(0, 1, ECE_BINS + 1).tolist(), "count": self.bin_count[r].tolist(),
                "correct": self.bin_correct[r].tolist(),
                "confidence_sum": [int(x) / SCALE for x in self.bin_conf[r].tolist()]}


def _per_class(cm: np.ndarray):
    """(precision, recall, f1 as float64 [C], support int64 [C]) of a confusion matrix, 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denominator = support + predicted                  # 2 tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
    return precision, recall, f1, support
