"""Mergeable accumulators for the jobs' aggregates, in plain numpy (no Beam).

Each accumulator has `add` (a batch of rows' arrays), `merge` (another accumulator of the same settings)
and a read-out; the Beam `CombineFn`s in `bulkinfer.tasks` wrap them.  Their state is fixed-size and
their counts and sums are exact integers, so results do not depend on how rows were split or merged.
"""
