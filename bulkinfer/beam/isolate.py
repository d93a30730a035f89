"""Runs a model over many rows and, when it fails, bisects until the failing rows are isolated.

A model failure costs only the rows that cause it (Beam's RunInference loses the whole batch).  A
failure that is not the rows' fault (see `is_infrastructure_failure`) is not bisected and costs no row:
it propagates, the bundle fails and the runner retries it, and nothing is committed for its rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bulkinfer.errors import is_infrastructure_failure
from bulkinfer.runtime import EngineStats


def predict_isolating(loaded, inputs: Mapping[str, np.ndarray | list], n: int, stats: EngineStats
                      ) -> tuple[dict[str, np.ndarray] | None, dict[int, str]]:
    """Predictions for all n rows; if the model fails, bisect until the failing rows are isolated.

    inputs: {input name: n rows' values}, as `loaded.predict` takes them.
    Returns ({output name: [n, ...] array, rows that failed holding zeros}, or None if every row failed;
    {row index: error text} for the rows that failed alone).
    Raises whatever `is_infrastructure_failure` accepts, at once and without bisecting.
    """
    errors: dict[int, str] = {}
    out: dict[str, np.ndarray] | None = None
    # Bisection with an explicit stack, not a recursive closure: a closure that calls itself is a
    # reference cycle, which kept each call's [n, ...] outputs alive until Python's cyclic collector
    # ran (bench/memory.py: ~350 MB more at 200,000 MiniLM rows than at 10,000).
    todo = [(0, n)]  # row ranges [lo, hi) to run, the next one last
    while todo:
        lo, hi = todo.pop()
        try:
            part = loaded.predict({name: values[lo:hi] for name, values in inputs.items()}, stats=stats)
        except Exception as e:  # any model failure: isolate it, never lose the rest
            if is_infrastructure_failure(e):
                raise
            if hi - lo == 1:
                errors[lo] = f"{type(e).__name__}: {e}"
            else:
                mid = (lo + hi) // 2
                todo += [(mid, hi), (lo, mid)]  # the lower half first
            continue
        if out is None:
            out = {name: np.zeros((n,) + p.shape[1:], p.dtype) for name, p in part.items()}
        for name, p in part.items():
            out[name][lo:hi] = p
    return out, errors
