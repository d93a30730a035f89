"""Mergeable aggregates over plain numpy state (no Beam): classification metrics, the Poisson bootstrap,
prediction statistics (sketches, histograms, exact moments, a hash sample) and drift.

Each is an object with `add`, `merge` and a result, so that a `beam.CombineFn` (bulkinfer.tasks) can
wrap it and the result does not depend on how the rows were split among workers.
"""
