"""Sketches and prediction statistics: exact where they claim to be, within KLL's stated error otherwise."""

import pickle

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from bulkinfer.metrics.drift import js_distance
from bulkinfer.metrics.prediction_stats import ClassifierStats, EmbedderStats, mean_pairwise_cosine
from bulkinfer.metrics.sketches import BottomKSample, ExactMoments, Histogram, QuantileSketch, id_hash

RANKS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _parts(n: int, pieces: int, rng) -> list[np.ndarray]:
    """Index ranges that split range(n) into `pieces` uneven, shuffled parts."""
    cuts = np.sort(rng.choice(np.arange(1, n), pieces - 1, replace=False))
    parts = np.split(np.arange(n), cuts)
    rng.shuffle(parts)
    return parts


def _merged(make, add, parts):
    """Accumulate each part separately (pickled, as Beam ships them), then merge in the given order."""
    accs = []
    for part in parts:
        acc = make()
        add(acc, part)
        accs.append(pickle.loads(pickle.dumps(acc)))
    total = accs[0]
    for acc in accs[1:]:
        total.merge(acc)
    return total


def _assert_within_rank_error(values: np.ndarray, ranks, quantiles, eps: float) -> None:
    """A returned value v is a valid q-quantile within eps: fraction(< v) <= q + eps and fraction(<= v) >= q - eps."""
    s = np.sort(values.astype(np.float32))
    for q, v in zip(ranks, quantiles):
        below = np.searchsorted(s, np.float32(v), side="left") / s.size
        upto = np.searchsorted(s, np.float32(v), side="right") / s.size
        assert below <= q + eps and upto >= q - eps, (q, v, below, upto, eps)


def test_kll_quantiles_within_the_stated_rank_error_of_numpys_exact_ones():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(0, 1, 30_000), rng.uniform(5, 6, 10_000)])
    sketch = _merged(lambda: QuantileSketch(200), lambda a, idx: a.add(values[idx]), _parts(values.size, 7, rng))
    assert sketch.n == values.size
    assert 0.01 < sketch.rank_error < 0.02  # k=200: DataSketches states ~1.33%
    _assert_within_rank_error(values, RANKS, sketch.quantiles(RANKS), sketch.rank_error)
    # The error is KLL's, not a loose bound: numpy's exact quantiles sit within it too.
    exact = np.quantile(values, RANKS)
    _assert_within_rank_error(values, RANKS, exact, 1 / values.size)


def test_kll_leaves_out_non_finite_values_and_refuses_other_k():
    sketch = QuantileSketch(64)
    assert sketch.quantiles([0.5]) == [None]
    assert sketch.add(np.array([1.0, np.nan, np.inf, 2.0])) == 2
    assert sketch.n == 2
    with pytest.raises(ValueError, match="k=64 and k=200"):
        sketch.merge(QuantileSketch(200))
    with pytest.raises(ValueError, match="8..65535"):
        QuantileSketch(4)


def test_histogram_counts_equal_numpys_and_count_every_value():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.5, 0.3, 5000), [np.nan, 1.0, 0.0]])
    edges = np.linspace(0, 1, 21)
    h = _merged(lambda: Histogram(edges), lambda a, idx: a.add(values[idx]), _parts(values.size, 5, rng))
    finite = values[np.isfinite(values)]
    expected, _ = np.histogram(finite, edges)  # numpy's last bin is closed too
    np.testing.assert_array_equal(h.counts, expected)
    assert h.below == int((finite < 0).sum()) and h.above == int((finite > 1).sum()) and h.nonfinite == 1
    assert h.total + h.below + h.above + h.nonfinite == values.size
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram([0, 1, 1])


def test_exact_moments_are_identical_across_splits_and_accurate_without_cancellation():
    rng = np.random.default_rng(2)
    # A large offset with a tiny spread: the naive E[x^2] - E[x]^2 in float64 loses every digit here.
    x = np.stack([1e6 + rng.normal(0, 1e-3, 4000), rng.normal(0, 1, 4000), rng.uniform(-2, 2, 4000)], axis=1)

    def add(acc, idx):
        acc.add(x[idx])

    a = _merged(lambda: ExactMoments(3), add, _parts(len(x), 7, rng))
    b = _merged(lambda: ExactMoments(3), add, [np.arange(len(x))])
    assert a.n == b.n == len(x)
    assert list(a.s1) == list(b.s1) and list(a.s2) == list(b.s2)  # exact integers, whatever the split
    np.testing.assert_array_equal(a.mean(), b.mean())
    np.testing.assert_array_equal(a.variance(), b.variance())
    # Rounding each value to 2**-32 moves a variance by about 2**-32 * spread: far below these tolerances.
    np.testing.assert_allclose(a.mean(), x.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(a.variance(), x.var(axis=0), rtol=1e-6)


def test_exact_moments_reject_rows_they_cannot_hold():
    m = ExactMoments(2)
    taken = m.add(np.array([[1.0, 2.0], [np.nan, 0.0], [2.0 ** 31, 0.0], [3.0, 4.0]]))
    assert taken.tolist() == [True, False, False, True]
    assert m.n == 2 and m.rejected == 2
    np.testing.assert_array_equal(m.mean(), [2.0, 3.0])
    np.testing.assert_array_equal(m.variance(), [1.0, 1.0])
    with pytest.raises(ValueError, match="rows of 2 values"):
        m.add(np.zeros((3, 5)))


def test_bottom_k_sample_is_the_k_smallest_hashes_whatever_the_split():
    rng = np.random.default_rng(3)
    ids = [f"row-{i}" for i in range(3000)] + list(range(500))
    vectors = rng.normal(size=(len(ids), 4)).astype(np.float32)

    def add(acc, idx):
        acc.add([ids[i] for i in idx], vectors[idx])

    a = _merged(lambda: BottomKSample(50, 4, seed=7), add, _parts(len(ids), 7, rng))
    b = _merged(lambda: BottomKSample(50, 4, seed=7), add, [np.arange(len(ids))])
    assert a.keys == b.keys
    np.testing.assert_array_equal(a.vectors, b.vectors)
    smallest = sorted(range(len(ids)), key=lambda i: id_hash(ids[i], 7))[:50]
    assert [k[0] for k in a.keys] == [id_hash(ids[i], 7) for i in smallest]
    np.testing.assert_array_equal(a.vectors, vectors[smallest])
    assert id_hash(7) == id_hash("7") == id_hash(np.int64(7)) != id_hash(8)  # however the id column is stored


def test_js_distance_matches_scipy():
    rng = np.random.default_rng(4)
    for _ in range(20):
        p, q = rng.integers(0, 50, 12), rng.integers(0, 50, 12)
        p[rng.integers(0, 12, 3)] = 0  # empty bins on one side
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    assert js_distance([5, 5], [1, 1]) == 0.0
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same bins"):
        js_distance([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        js_distance([0, 0], [1, 2])


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_classifier_stats_agree_with_numpy_and_across_splits():
    rng = np.random.default_rng(5)
    probs = _softmax(rng.normal(0, 3, (5000, 6)))
    probs[17] = np.nan

    def add(acc, idx):
        acc.add(probs[idx])

    a = _merged(lambda: ClassifierStats(6), add, _parts(len(probs), 7, rng)).to_json()
    b = _merged(lambda: ClassifierStats(6), add, [np.arange(len(probs))]).to_json()
    for section in ("confidence", "margin", "entropy_bits"):
        assert a[section].pop("quantiles").keys() == b[section].pop("quantiles").keys()
    assert a == b  # everything but KLL quantiles is identical
    ok = np.delete(probs, 17, axis=0).astype(np.float64)
    assert a["rows"] == 4999 and a["rows_nonfinite"] == 1
    assert a["class_counts"] == np.bincount(ok.argmax(axis=1), minlength=6).tolist()
    top2 = -np.sort(-ok, axis=1)[:, :2]
    assert a["confidence"]["mean"] == pytest.approx(top2[:, 0].mean(), rel=1e-9)
    assert a["margin"]["mean"] == pytest.approx((top2[:, 0] - top2[:, 1]).mean(), rel=1e-9)
    assert a["entropy_bits"]["mean"] == pytest.approx(scipy_entropy(ok, base=2, axis=1).mean(), rel=1e-6)
    assert a["confidence"]["histogram"]["counts"] == np.histogram(top2[:, 0], np.linspace(0, 1, 21))[0].tolist()


def test_classifier_quantiles_within_rank_error():
    rng = np.random.default_rng(6)
    probs = _softmax(rng.normal(0, 2, (20_000, 4)))
    stats = _merged(lambda: ClassifierStats(4), lambda a, idx: a.add(probs[idx]), _parts(len(probs), 3, rng))
    eps = stats.confidence.sketch.rank_error
    quantiles = stats.to_json()["confidence"]["quantiles"]
    _assert_within_rank_error(probs.astype(np.float64).max(axis=1), RANKS, [quantiles[f"{r:g}"] for r in RANKS],
                              eps)


def test_embedder_stats_agree_with_numpy_and_across_splits():
    rng = np.random.default_rng(8)
    emb = (rng.normal(0, 1, (3000, 8)) + rng.normal(0, 1, 8)).astype(np.float32)
    emb[5] = 0.0  # a zero vector: no cosine, so not sampled
    emb[9, 2] = np.inf
    ids = list(range(3000))

    def add(acc, idx):
        acc.add([ids[i] for i in idx], emb[idx])

    make = lambda: EmbedderStats(8, sample_size=200)  # noqa: E731
    a, whole = _merged(make, add, _parts(len(ids), 7, rng)), _merged(make, add, [np.arange(len(ids))])
    ja, jb = a.to_json(), whole.to_json()
    assert ja["norm"].pop("quantiles").keys() == jb["norm"].pop("quantiles").keys()
    assert ja == jb
    ok = np.delete(emb, 9, axis=0).astype(np.float64)
    assert ja["rows"] == 2999 and ja["rows_nonfinite"] == 1 and ja["rows_zero_norm"] == 1
    np.testing.assert_allclose(ja["mean"], ok.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(ja["variance"], ok.var(axis=0), rtol=1e-7)
    assert ja["norm"]["mean"] == pytest.approx(np.linalg.norm(ok, axis=1).mean(), rel=1e-9)
    # The cosine: brute force over every pair of the sampled rows, which are those with the 200 smallest hashes.
    candidates = [i for i in ids if i not in (5, 9)]
    sampled = sorted(candidates, key=id_hash)[:200]
    units = emb[sampled].astype(np.float64)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    upper = (units @ units.T)[np.triu_indices(200, 1)]
    assert ja["cosine_sample"]["size"] == 200 and ja["cosine_sample"]["pairs"] == upper.size
    assert ja["cosine_sample"]["mean_pairwise_cosine"] == pytest.approx(upper.mean(), abs=1e-12)
    assert mean_pairwise_cosine(emb[sampled]) == pytest.approx(upper.mean(), abs=1e-12)
