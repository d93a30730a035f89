import logging
import threading

import jax
import numpy as np
import pytest

from bulkinfer.runtime import Bucketing, Engine, EngineStats
from bulkinfer.testing import out_of_memory_above, random_token_rows, tiny_bert

# Tiny shapes: compiles dominate these tests, so every bucketing here has few shapes.
LENGTHS = (4, 8, 16)
BUCKETS = Bucketing(lengths=LENGTHS, token_budget=64, max_batch=16, ladder=1)  # 6 shapes
ONE_BY_ONE = Bucketing(lengths=(16,), token_budget=16, max_batch=1, ladder=0)  # 1 shape: (1, 16)


@pytest.fixture(scope="module")
def model():
    return tiny_bert(layers=1)


@pytest.fixture(scope="module")
def rows():
    return random_token_rows(120, max_len=16, seed=1)


@pytest.fixture(scope="module")
def unpadded(model, rows):
    """Reference outputs: each row in a batch of its own (padded to 16 with a masked tail)."""
    return Engine(*model, bucketing=ONE_BY_ONE).run(rows)


def test_padding_changes_nothing(model, rows, unpadded):
    fn, params = model
    jitted = jax.jit(fn)
    for r in (rows[0], rows[1], np.arange(1, 17, dtype=np.int32)):  # exact length, no padding at all
        exact = np.asarray(jitted(params, r[None], np.ones((1, len(r)), np.int32)))[0]
        padded = Engine(fn, params, bucketing=ONE_BY_ONE).run([r])[0]
        np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_outputs_match_one_by_one_in_input_order(model, rows, unpadded):
    engine = Engine(*model, bucketing=BUCKETS)
    out = engine.run(rows)
    assert out.shape == unpadded.shape
    np.testing.assert_allclose(out, unpadded, atol=1e-5)
    assert engine.stats.rows == len(rows)
    assert engine.stats.real_tokens == sum(len(r) for r in rows)
    assert 0.5 < engine.stats.padding_efficiency <= 1.0


@pytest.mark.parametrize("bucketing", [
    Bucketing(lengths=(16,), token_budget=64, ladder=0, tails="pad"),
    Bucketing(lengths=(3, 6, 10, 16), token_budget=96, max_batch=32, ladder=0),
])
def test_other_bucketings_give_the_same_outputs(model, rows, unpadded, bucketing):
    out = Engine(*model, bucketing=bucketing).run(rows)
    np.testing.assert_allclose(out, unpadded, atol=1e-5)


def test_no_compile_after_warmup_on_mixed_lengths(model):
    engine = Engine(*model, bucketing=BUCKETS)
    engine.warmup()
    warm = engine.stats.compiles
    assert warm == len(BUCKETS.shapes())
    for seed, n in enumerate((7, 150, 33)):  # different sizes and length mixes: tails stay on the ladder
        call = EngineStats()
        engine.run(random_token_rows(n, max_len=16, seed=seed), stats=call)
        assert call.compiles == 0
    assert engine.stats.compiles == warm


def test_out_of_memory_halves_the_budget_and_loses_no_row(model, rows, unpadded, caplog):
    fn, params = model
    # Full batches of the 4-token bucket have 16 rows; anything above 4 rows "runs out of memory".
    engine = Engine(out_of_memory_above(fn, 4), params, bucketing=BUCKETS)
    with caplog.at_level(logging.WARNING, logger="bulkinfer.runtime.engine"):
        stats = EngineStats()
        out = engine.run(rows, stats=stats)
    np.testing.assert_allclose(out, unpadded, atol=1e-5)
    assert stats.oom_backoffs >= 1 and engine.stats.oom_backoffs == stats.oom_backoffs
    assert engine.bucketing.token_budget <= 64 // 4
    assert max(engine.bucketing.batch_sizes(n)[0] for n in LENGTHS) <= 4
    assert any("halving the token budget" in r.getMessage() for r in caplog.records)
    # The lowered budget holds for the rest of the run: no further failures.
    again = EngineStats()
    np.testing.assert_allclose(engine.run(rows[:50], stats=again), unpadded[:50], atol=1e-5)
    assert again.oom_backoffs == 0


def test_out_of_memory_at_the_smallest_budget_names_the_fix(model, rows):
    fn, params = model
    engine = Engine(out_of_memory_above(fn, 0), params, bucketing=BUCKETS)
    with pytest.raises(RuntimeError, match="out of device memory .* use a shorter max_length"):
        engine.run(rows[:10])


def test_other_errors_are_not_taken_for_out_of_memory(model, rows):
    fn, params = model

    def broken(params, ids, mask):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        Engine(broken, params, bucketing=BUCKETS).run(rows[:10])


def test_threads_share_one_engine(model, rows, unpadded):
    engine = Engine(*model, bucketing=BUCKETS)
    results: dict[int, np.ndarray] = {}

    def work(k):
        results[k] = engine.run(rows[k::4])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        np.testing.assert_allclose(results[k], unpadded[k::4], atol=1e-5)
    assert engine.stats.rows == len(rows)


def test_busy_time_is_within_the_run_time(model, rows):
    engine = Engine(*model, bucketing=BUCKETS)
    engine.warmup()
    stats = EngineStats()
    engine.run(rows, stats=stats)
    assert 0 < stats.busy_s <= stats.run_s


def test_empty_rows_are_an_error_that_names_the_row(model):
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        Engine(*model, bucketing=BUCKETS).run([np.array([1, 2], np.int32), np.array([], np.int32)])
