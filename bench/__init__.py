"""Benchmarks for BENCHMARKS.md (`make bench`): bulkinfer against its own limit and against its peers.

Not part of the bulkinfer package and not run by `make test`.  `bench/run.py` runs every row of the
table side by side in one process; the peers (PyTorch, sentence-transformers) are imported only there.
"""
