import logging
import threading

import jax
import numpy as np
import pytest

from bulkinfer.runtime import Bucketing, Engine, EngineStats, process
from bulkinfer.testing import (
    TINY_BERT_INPUTS,
    OutOfMemoryWhileRunning,
    out_of_memory_above,
    random_token_rows,
    tiny_bert,
)

# Tiny shapes: compiles dominate these tests, so every bucketing here has few shapes.
LENGTHS = (4, 8, 16)
BUCKETS = Bucketing(lengths=LENGTHS, token_budget=64, max_batch=16, ladder=1)  # 6 shapes
ONE_BY_ONE = Bucketing(lengths=(16,), token_budget=16, max_batch=1, ladder=0)  # 1 shape: (1, 16)


def text_engine(fn, params, bucketing, **kwargs) -> Engine:
    return Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=bucketing, **kwargs)


def embed(engine: Engine, rows, stats=None) -> np.ndarray:
    out = engine.run({"input_ids": rows}, stats=stats)
    assert list(out) == ["output"]
    return out["output"]


@pytest.fixture(scope="module")
def model():
    return tiny_bert(layers=1)


@pytest.fixture(scope="module")
def rows():
    return random_token_rows(120, max_len=16, seed=1)


@pytest.fixture(scope="module")
def unpadded(model, rows):
    """Reference outputs: each row in a batch of its own (padded to 16 with a masked tail)."""
    return embed(text_engine(*model, ONE_BY_ONE), rows)


def test_padding_changes_nothing(model, rows, unpadded):
    fn, params = model
    jitted = jax.jit(fn)
    engine = text_engine(fn, params, ONE_BY_ONE)
    for r in (rows[0], rows[1], np.arange(1, 17, dtype=np.int32)):  # exact length, no padding at all
        exact = np.asarray(jitted(params, {"input_ids": r[None], "mask": np.ones((1, len(r)), np.int32)}))[0]
        padded = embed(engine, [r])[0]
        np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_every_tail_size_matches_fn_on_unpadded_rows(model, rows):
    # Batch sizes 16 and 8 for the 4-token bucket: n rows of 1..4 tokens leave tails of every size.
    fn, params = model
    jitted = jax.jit(fn)
    engine = text_engine(fn, params, BUCKETS)
    short = [r[:4] for r in rows[:40]]
    for n in range(1, 18):
        out = embed(engine, short[:n])
        for i, r in enumerate(short[:n]):
            exact = np.asarray(jitted(params, {"input_ids": r[None], "mask": np.ones((1, len(r)), np.int32)}))[0]
            np.testing.assert_allclose(out[i], exact, atol=1e-5, err_msg=f"row {i} of {n}")


def test_filler_rows_and_padding_hold_the_pad_value_and_a_zero_mask():
    seen = {}

    def record(params, batch):
        seen[batch["input_ids"].shape] = None  # traced once per shape
        return jax.numpy.stack([batch["input_ids"].sum(-1), batch["mask"].sum(-1)], -1) + params  # [B, 2]

    engine = Engine(record, np.int32(0), inputs=TINY_BERT_INPUTS, pad_values={"input_ids": 7},
                    bucketing=Bucketing(lengths=(4,), token_budget=16, max_batch=4, ladder=0))
    out = engine.run({"input_ids": [np.array([1, 2], np.int32), np.array([3], np.int32)]})["output"]
    # Only the real rows come back; their padded positions hold 7 (2 and 3 of them), the mask counts real ones.
    np.testing.assert_array_equal(out, [[1 + 2 + 7 + 7, 2], [3 + 7 + 7 + 7, 1]])
    assert list(seen) == [(4, 4)]


def test_outputs_match_one_by_one_in_input_order(model, rows, unpadded):
    engine = text_engine(*model, BUCKETS)
    out = embed(engine, rows)
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
    out = embed(text_engine(*model, bucketing), rows)
    np.testing.assert_allclose(out, unpadded, atol=1e-5)


def test_no_compile_after_warmup_on_mixed_lengths(model):
    engine = text_engine(*model, BUCKETS)
    engine.warmup()
    warm = engine.stats.compiles
    assert warm == len(BUCKETS.shapes())
    for seed, n in enumerate((7, 150, 33)):  # different sizes and length mixes: tails stay on the ladder
        call = EngineStats()
        embed(engine, random_token_rows(n, max_len=16, seed=seed), stats=call)
        assert call.compiles == 0
    assert engine.stats.compiles == warm


def test_out_of_memory_at_compile_halves_the_budget_and_loses_no_row(model, rows, unpadded, caplog):
    fn, params = model
    # Full batches of the 4-token bucket have 16 rows; anything above 4 rows "runs out of memory".
    engine = text_engine(out_of_memory_above(fn, 4), params, BUCKETS)
    with caplog.at_level(logging.WARNING, logger="bulkinfer.runtime.engine"):
        stats = EngineStats()
        out = embed(engine, rows, stats=stats)
    np.testing.assert_allclose(out, unpadded, atol=1e-5)
    assert stats.oom_backoffs >= 1 and engine.stats.oom_backoffs == stats.oom_backoffs
    assert engine.bucketing.token_budget <= 64 // 4
    assert max(engine.bucketing.batch_sizes(n)[0] for n in LENGTHS) <= 4
    assert any("halving the token budget" in r.getMessage() for r in caplog.records)
    # The lowered budget holds for the rest of the run: no further failures.
    again = EngineStats()
    np.testing.assert_allclose(embed(engine, rows[:50], stats=again), unpadded[:50], atol=1e-5)
    assert again.oom_backoffs == 0


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_out_of_memory_while_running_halves_the_budget_and_loses_no_row(model, rows, unpadded, max_in_flight):
    fn, params = model
    clock = OutOfMemoryWhileRunning(max_rows=4)
    engine = text_engine(fn, params, BUCKETS, clock=clock, max_in_flight=max_in_flight)
    engine.warmup()  # every shape compiles: the failures below happen only while batches run
    stats = EngineStats()
    out = embed(engine, rows, stats=stats)
    np.testing.assert_allclose(out, unpadded, atol=1e-5)
    assert clock.failures >= 1 and stats.oom_backoffs == clock.failures
    assert stats.rows == len(rows) and stats.real_tokens == sum(len(r) for r in rows)
    assert max(engine.bucketing.batch_sizes(n)[0] for n in LENGTHS) <= 4
    # Once the budget is halved, the rest of the plan is replanned, not run into the same failure:
    # only batches already in flight can still fail.  Two halvings (16 -> 8 -> 4 rows) allow at most
    # (max_in_flight + 1) failures each.
    assert clock.failures <= 2 * (max_in_flight + 1)
    failed = clock.failures
    np.testing.assert_allclose(embed(engine, rows[:50]), unpadded[:50], atol=1e-5)
    assert clock.failures == failed


def test_out_of_memory_at_the_smallest_budget_names_the_fix(model, rows):
    fn, params = model
    engine = text_engine(out_of_memory_above(fn, 0), params, BUCKETS)
    with pytest.raises(RuntimeError, match="out of device memory .* use a shorter max_length"):
        embed(engine, rows[:10])
    running = text_engine(fn, params, BUCKETS, clock=OutOfMemoryWhileRunning(max_rows=0))
    with pytest.raises(RuntimeError, match="out of device memory .* use a shorter max_length"):
        embed(running, rows[:10])


def test_other_errors_are_not_taken_for_out_of_memory(model, rows):
    fn, params = model

    def broken(params, batch):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        embed(text_engine(broken, params, BUCKETS), rows[:10])


def test_threads_share_one_engine(model, rows, unpadded):
    engine = text_engine(*model, BUCKETS)
    results: dict[int, np.ndarray] = {}

    def work(k):
        results[k] = embed(engine, rows[k::4])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        np.testing.assert_allclose(results[k], unpadded[k::4], atol=1e-5)
    assert engine.stats.rows == len(rows)


def test_busy_time_is_within_the_run_time(model, rows):
    engine = text_engine(*model, BUCKETS)
    engine.warmup()
    stats = EngineStats()
    embed(engine, rows, stats=stats)
    assert 0 < stats.busy_s <= stats.run_s


def test_empty_and_over_long_rows_are_errors_that_name_the_row(model):
    engine = text_engine(*model, BUCKETS)
    with pytest.raises(ValueError, match="row 1: input 'input_ids' is empty"):
        embed(engine, [np.array([1, 2], np.int32), np.array([], np.int32)])
    with pytest.raises(ValueError, match="row 2: input 'input_ids' has length 17 .* longest bucket is 16"):
        embed(engine, [np.ones(3, np.int32), np.ones(16, np.int32), np.ones(17, np.int32)])
    assert engine.stats.compiles == 0  # checked before anything ran


def test_xla_defaults_off_give_the_same_outputs(model, rows, unpadded, monkeypatch):
    """The engine compiles with process.compiler_options; without them (XLA's own defaults) outputs agree."""
    assert text_engine(*model, ONE_BY_ONE).compiler_options == process.XLA_CPU_OPTIONS  # as `unpadded`'s
    monkeypatch.setenv(process.DEFAULTS_ENV, "0")
    plain = text_engine(*model, ONE_BY_ONE)
    assert plain.compiler_options == {}
    np.testing.assert_allclose(embed(plain, rows), unpadded, rtol=1e-5, atol=1e-6)


def test_options_this_jaxlib_refuses_fall_back_to_xla_defaults(model, rows, unpadded, monkeypatch, caplog):
    monkeypatch.setattr(process, "XLA_CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
    engine = text_engine(*model, ONE_BY_ONE)
    assert engine.compiler_options == {"xla_cpu_no_such_option": "1"}
    with caplog.at_level(logging.WARNING, logger="bulkinfer.runtime.engine"):
        np.testing.assert_allclose(embed(engine, rows), unpadded, rtol=1e-5, atol=1e-6)
    assert engine.compiler_options == {}
    assert "refuses the XLA options {'xla_cpu_no_such_option': '1'}" in caplog.text
