"""Poisson bootstrap weights: a pure function of (seed, row id, replicate), Poisson(1) distributed."""

import math

import numpy as np
import pytest

from bulkinfer.metrics.bootstrap import percentile_interval, poisson_weights, row_key, row_keys, splitmix64


def test_weights_depend_only_on_seed_id_and_replicate():
    ids = [f"row-{i}" for i in range(50)] + list(range(50))
    w = poisson_weights(row_keys(ids, seed=3), 30)
    perm = np.random.default_rng(0).permutation(len(ids))
    again = poisson_weights(row_keys([ids[i] for i in perm], seed=3), 30)
    assert (again == w[perm]).all()                                           # order and batching do not matter
    assert (poisson_weights(row_keys(ids, seed=3), 10, start=20) == w[:, 20:]).all()
    assert not (poisson_weights(row_keys(ids, seed=4), 30) == w).all()        # the seed does
    assert row_key(7, 0) == row_key("7", 0) == row_key(np.int64(7), 0)  # a CSV's "7" is a JSON file's 7
    assert row_key(7, 0) != row_key(8, 0) and row_key(7, 0) != row_key(7, 1)


def test_weights_are_poisson_1():
    w = poisson_weights(row_keys(range(20_000), seed=0), 50).ravel()
    observed = np.bincount(w, minlength=8)[:8] / w.size
    expected = np.array([math.exp(-1) / math.factorial(k) for k in range(8)])
    np.testing.assert_allclose(observed, expected, atol=0.002)  # 1M draws: standard errors < 0.0005
    assert abs(w.mean() - 1) < 0.005 and abs(w.var() - 1) < 0.01


def test_splitmix64_matches_the_reference_values():
    # splitmix64 seeded with 0: the first outputs of the reference C implementation (Vigna, prng.di.unimi.it).
    gamma = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        states = np.arange(1, 4, dtype=np.uint64) * gamma
    assert [int(x) for x in splitmix64(states)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_a_row_without_an_id_and_empty_intervals_are_handled():
    with pytest.raises(ValueError, match="the row has no id"):
        row_key(None, 0)
    assert percentile_interval([np.nan, np.nan]) == [None, None]
    assert percentile_interval([1.0, 2.0, 3.0, np.nan], (0, 100)) == [1.0, 3.0]
