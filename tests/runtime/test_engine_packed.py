"""Packed (padding-free) batches: the plan, the batch layout, and outputs equal to the padded engine's."""

import functools
import logging

import numpy as np
import pytest

from bulkinfer.models import bert
from bulkinfer.models.text import embed_batch
from bulkinfer.runtime import Bucketing, Engine, EngineStats
from bulkinfer.runtime import inputs as _inputs
from bulkinfer.testing import TINY_BERT_INPUTS, OutOfMemoryWhileRunning, random_token_rows, tiny_bert

BUCKETS = Bucketing(lengths=(4, 8, 16), token_budget=64, max_batch=32, ladder=1)


@pytest.fixture(scope="module")
def model():
    return tiny_bert(layers=1)


@pytest.fixture(scope="module")
def rows():
    return random_token_rows(150, max_len=16, seed=3)


def run(engine, rows, stats=None):
    return engine.run({"input_ids": rows}, stats=stats)["output"]


@pytest.mark.parametrize("lengths", [
    np.random.default_rng(0).integers(1, 17, 300),  # uniform
    np.clip(np.random.default_rng(1).lognormal(1.5, 0.8, 500).astype(int), 1, 16),  # skewed, mostly short
    np.full(40, 16), np.array([3]), np.zeros(0, np.int64),
])
def test_every_row_is_packed_once_within_its_batch_shape(lengths):
    plan = BUCKETS.pack(lengths)
    seen = np.concatenate([idx for *_, idx in plan]) if plan else np.zeros(0, np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    shapes = set(BUCKETS.packed_shapes())
    for rows, length, tokens, idx in plan:
        assert (rows, length, tokens) in shapes
        assert len(idx) <= rows and lengths[idx].max() <= length and lengths[idx].sum() <= tokens
        # The layout's length is the bucket of the batch's longest row.
        assert length == min(n for n in BUCKETS.lengths if n >= lengths[idx].max())
    if len(lengths) > 100:  # nearly every batch but the last is full: far fewer tokens than padding
        computed = sum(tokens for _, _, tokens, _ in plan)
        padded = sum(b * n for b, n, _ in BUCKETS.plan(lengths))
        assert lengths.sum() / computed >= 0.9 and computed < padded


@pytest.mark.parametrize("bucketing", [Bucketing(lengths=(512,), token_budget=1024),
                                       Bucketing(lengths=(16, 32, 64, 128), token_budget=256, ladder=2),
                                       Bucketing().for_max_length(256)])
def test_attention_layouts_stay_within_twice_the_token_budget(bucketing):
    # Without the cap, a first bucket of 512 would get 1024 row slots of 512 positions.
    lengths = np.random.default_rng(2).integers(1, bucketing.lengths[-1] + 1, 400)
    shapes = bucketing.packed_shapes()
    assert all(rows * length <= 2 * bucketing.token_budget for rows, length, _ in shapes)
    assert {(r, n, t) for r, n, t, _ in bucketing.pack(lengths)} <= set(shapes)


def test_a_row_longer_than_the_last_bucket_is_an_error_naming_it():
    with pytest.raises(ValueError, match="row 1 has 17 tokens; the longest bucket is 16"):
        BUCKETS.pack(np.array([3, 17]))


def test_the_packed_batch_says_where_every_token_belongs():
    specs = _inputs.parse({"ids": ((None,), "int32"), "scale": ((2,), "float32")}, {"ids": -1})
    arrays = {"ids": [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([9, 10], np.int32)],
              "scale": np.arange(6, dtype=np.float32).reshape(3, 2)}
    rows, lengths = np.array([2, 0]), np.array([2, 3])
    b = _inputs.pack(specs, arrays, rows, lengths, batch=3, length=4, tokens=8)
    np.testing.assert_array_equal(b["ids"], [9, 10, 5, 6, 7, -1, -1, -1])  # [T]: rows end to end, then pads
    np.testing.assert_array_equal(b["row_ids"], [0, 0, 1, 1, 1, 3, 3, 3])  # filler tokens: row B (3)
    np.testing.assert_array_equal(b["positions"], [0, 1, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["token_index"], [[0, 1, 8, 8], [2, 3, 4, 8], [8, 8, 8, 8]])  # padding: T
    np.testing.assert_array_equal(b["mask"], [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["scale"], [[4, 5], [0, 1], [0, 0]])  # fixed-shape inputs stay [B, ...]
    # Every real token, gathered back through token_index, is the row's own token.
    for slot, r in enumerate(rows):
        np.testing.assert_array_equal(b["ids"][b["token_index"][slot, : lengths[slot]]], arrays["ids"][r])


@pytest.mark.parametrize("config", [
    {},  # BERT: absolute positions
    {"family": "roberta", "padding_idx": 1},  # positions count real tokens after padding_idx
])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_packed_outputs_equal_the_padded_engines(model, rows, config, pooling):
    _, params = model
    cfg = bert.BertConfig(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                          max_position=128, **config)
    fn = functools.partial(embed_batch, config=cfg, pooling=pooling, normalize=True)
    padded = run(Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=BUCKETS), rows)
    stats = EngineStats()
    engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=BUCKETS, packed=True)
    packed = run(engine, rows, stats)
    np.testing.assert_allclose(packed, padded, atol=2e-6)
    # The counts: every real token once, and computed tokens are the batches' token capacities.
    assert stats.rows == len(rows) and stats.real_tokens == sum(map(len, rows))
    assert stats.real_tokens <= stats.padded_tokens < sum(len(r) for r in rows) / 0.8


def test_warmup_compiles_every_packed_shape_and_runs_compile_nothing(model):
    engine = Engine(*model, inputs=TINY_BERT_INPUTS, bucketing=BUCKETS, packed=True)
    engine.warmup()
    assert engine.stats.compiles == len(BUCKETS.packed_shapes()) == len(engine.shapes())
    for seed, n in enumerate((5, 200)):
        call = EngineStats()
        run(engine, random_token_rows(n, max_len=16, seed=seed), call)
        assert call.compiles == 0


def test_out_of_memory_while_running_halves_the_tokens_and_loses_no_row(model, rows, caplog):
    fn, params = model
    want = run(Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=BUCKETS), rows)
    clock = OutOfMemoryWhileRunning(max_rows=16)  # batches whose output has more than 16 row slots fail
    engine = Engine(fn, params, inputs=TINY_BERT_INPUTS, bucketing=BUCKETS, packed=True, clock=clock)
    with caplog.at_level(logging.WARNING, logger="bulkinfer.runtime.engine"):
        got = run(engine, rows)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert clock.failures >= 1 and engine.bucketing.token_budget < BUCKETS.token_budget
    assert max(rows for rows, _, _ in engine.bucketing.packed_shapes()) <= 16
    assert "tokens) (token_budget 64); halving the token budget" in caplog.text


@pytest.mark.parametrize("inputs, match", [
    ({"pixels": ((4,), "float32")}, "no input has a variable axis"),
    ({"frames": ((3, None), "float32")}, r"variable axis is their first .*\['frames'\]"),
])
def test_packing_needs_a_leading_variable_axis(model, inputs, match):
    with pytest.raises(ValueError, match=match):
        Engine(model[0], model[1], inputs=inputs, bucketing=Bucketing.for_rows(batch_size=4)
               if "pixels" in inputs else BUCKETS, packed=True)
