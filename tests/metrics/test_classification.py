"""Classification metrics from mergeable counts equal scikit-learn's and do not depend on how rows are split."""

import numpy as np
import pytest
from sklearn import metrics as skm

from bulkinfer.metrics.bootstrap import poisson_weights, row_keys
from bulkinfer.metrics.classification import ClassificationCounts, row_terms


def _data(n=500, c=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2
    labels = np.where(rng.random(n) < 0.6, logits.argmax(1), rng.integers(0, c, n))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    probs[0, :] = np.eye(c, dtype=dtype)[(labels[0] + 1) % c]  # confidently wrong: log loss hits the clip
    return labels, probs


def ece_reference(labels, probs, bins=15):
    """Guo et al. 2017 eq. 3, written out directly."""
    conf, pred = probs.max(1).astype(np.float64), probs.argmax(1)
    total = 0.0
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        inside = (conf > lo) & (conf <= hi) if m else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("c, dtype", [(4, np.float32), (2, np.float64), (10, np.float32)])
def test_values_equal_sklearn(c, dtype):
    labels, probs = _data(c=c, dtype=dtype)
    m = ClassificationCounts(num_classes=c).add(labels, probs).metrics()
    pred = probs.argmax(1)
    assert m["rows"] == len(labels)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), rel=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0), rel=1e-12)
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(c)), rel=1e-6)
    assert m["brier"] == pytest.approx(
        skm.brier_score_loss(labels, probs, labels=range(c), scale_by_half=False), rel=1e-6)
    assert m["ece"] == pytest.approx(ece_reference(labels, probs), rel=1e-9, abs=1e-12)
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=range(c)).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=range(c), zero_division=0)
    np.testing.assert_allclose(m["per_class"]["precision"], p, rtol=1e-12)
    np.testing.assert_allclose(m["per_class"]["recall"], r, rtol=1e-12)
    np.testing.assert_allclose(m["per_class"]["f1"], f, rtol=1e-12)
    assert m["per_class"]["support"] == s.tolist()


def test_macro_f1_averages_the_classes_that_occur_as_sklearn_does():
    labels = np.array([0, 0, 1])
    probs = np.array([[.9, .1, 0, 0], [.2, .8, 0, 0], [.3, .7, 0, 0]], np.float32)  # classes 2, 3 never occur
    m = ClassificationCounts(num_classes=4).add(labels, probs).metrics()
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="macro", zero_division=0))
    assert m["per_class"]["f1"][2:] == [0.0, 0.0]


def test_bootstrap_weights_equal_sklearn_with_sample_weight():
    labels, probs = _data(n=300, c=3)
    w = poisson_weights(row_keys(range(300), seed=5), 4)
    counts = ClassificationCounts(num_classes=3, replicates=4).add(labels, probs, w)
    for r in range(4):
        m = counts.metrics(r)
        assert m["rows"] == w[:, r].sum()
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1), sample_weight=w[:, r]))
        assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(3), sample_weight=w[:, r]),
                                              rel=1e-6)


def test_merging_any_split_in_any_order_gives_identical_state():
    labels, probs = _data(n=700, c=5, seed=3)
    w = poisson_weights(row_keys(range(700), seed=1), 7)
    whole = ClassificationCounts(num_classes=5, replicates=7).add(labels, probs, w)
    rng = np.random.default_rng(0)
    order = rng.permutation(700)
    parts = [ClassificationCounts(num_classes=5, replicates=7).add(labels[i], probs[i], w[i])
             for i in np.array_split(order, 9)]
    merged = ClassificationCounts(num_classes=5, replicates=7).merge(parts[::-1])
    for r in range(7):
        assert merged.metrics(r) == whole.metrics(r)  # exactly equal, not approximately
    assert merged.log_loss.tolist() == whole.log_loss.tolist()


def test_ties_pick_the_first_class_and_bins_are_right_closed():
    t = row_terms(np.array([1, 0]), np.array([[0.5, 0.5], [1 / 15, 14 / 15]]))
    assert t["cell"].tolist() == [2, 1]  # true 1 predicted 0; true 0 predicted 1
    assert t["bin"].tolist() == [7, 13]  # 0.5 in (7/15, 8/15]; 14/15 closes bin 13


def test_too_many_replicates_for_the_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="keep replicates"):
        ClassificationCounts(num_classes=1000, replicates=100)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassificationCounts(num_classes=1)
