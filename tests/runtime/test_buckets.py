import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkinfer.runtime import Bucketing

SMALL = Bucketing(lengths=(4, 8, 16, 32), token_budget=64, max_batch=16, ladder=1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=300), st.sampled_from(["pad", "merge"]),
       st.integers(0, 3), st.integers(1, 3))
def test_plan_covers_every_row_once_within_allowed_shapes(lengths, tails, ladder, multiple):
    b = Bucketing(lengths=(4, 8, 16, 32), token_budget=64, max_batch=16, ladder=ladder, multiple=multiple,
                  tails=tails)
    lengths = np.array(lengths)
    plan = b.plan(lengths)
    rows = np.concatenate([r for _, _, r in plan])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    allowed = set(b.shapes())
    for size, length, r in plan:
        assert (size, length) in allowed
        assert len(r) <= size and size % multiple == 0
        assert lengths[r].max() <= length


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=300))
def test_carry_leaves_only_full_batches_and_names_the_rest(lengths):
    lengths = np.array(lengths)
    plan = SMALL.plan(lengths, final=False)
    carried = SMALL.carry(lengths)
    run = np.concatenate([r for _, _, r in plan]) if plan else np.zeros(0, np.int64)
    assert sorted(run.tolist() + carried.tolist()) == list(range(len(lengths)))
    assert all(len(r) == size == SMALL.batch_sizes(length)[0] for size, length, r in plan)


def test_merge_pads_fewer_tokens_than_dummy_rows():
    # A 30-token row and a 15-token row, no ladder: padding each bucket's tail needs 2 x 32 + 4 x 16
    # tokens; merging the short row into the long row's batch needs 2 x 32.
    lengths = np.array([30, 15])
    pad = Bucketing(lengths=(16, 32), token_budget=64, ladder=0, tails="pad").plan(lengths)
    merge = Bucketing(lengths=(16, 32), token_budget=64, ladder=0).plan(lengths)
    assert sum(s * n for s, n, _ in pad) == 128
    assert [(s, n, r.tolist()) for s, n, r in merge] == [(2, 32, [0, 1])]


def test_over_length_row_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="row 1 has 40 tokens"):
        SMALL.plan(np.array([3, 40]))


def test_halved_budget_keeps_lengths_and_stops_at_longest_bucket():
    half = SMALL.halved()
    assert half.token_budget == 32 and half.lengths == SMALL.lengths
    assert half.batch_sizes(8)[0] == SMALL.batch_sizes(8)[1]  # the old half size: already compiled
    assert half.halved() is None  # 16 < 32, the longest bucket


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="tails 'sometimes'"):
        Bucketing(tails="sometimes")
    with pytest.raises(ValueError, match="token_budget 16 is below the longest bucket 32"):
        Bucketing(lengths=(8, 32), token_budget=16)


def test_platform_default_budget_is_smaller_on_cpu_and_yields_to_settings():
    from bulkinfer.runtime.buckets import ACCELERATOR_TOKEN_BUDGET, PLATFORM_TOKEN_BUDGET

    cpu, gpu = Bucketing.for_platform("cpu"), Bucketing.for_platform("gpu")
    assert cpu.token_budget == PLATFORM_TOKEN_BUDGET["cpu"] < gpu.token_budget == ACCELERATOR_TOKEN_BUDGET
    assert Bucketing() == gpu  # the class default is the accelerators' budget
    assert Bucketing.for_platform("cpu", token_budget=4096, ladder=0) == Bucketing(token_budget=4096, ladder=0)
    # The longest default bucket (512) still fits the CPU budget twice: a full batch and its halving.
    assert cpu.batch_sizes(512) == (2, 1)
