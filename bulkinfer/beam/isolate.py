"""Runs a model over many rows and, when it fails, bisects until the failing rows are isolated.

A model failure costs only the rows that cause it (Beam's RunInference loses the whole batch).
"""

from __future__ import annotations

import numpy as np

from bulkinfer.errors import ModelUnavailable
from bulkinfer.runtime import EngineStats


def predict_isolating(loaded, values: list, stats: EngineStats):
    """Predictions for all values; if the model fails, bisect until the failing values are isolated.

    Returns (predictions indexed like values, {index: error text} for values that failed alone).
    """
    errors: dict[int, str] = {}
    out: np.ndarray | None = None

    def attempt(lo: int, hi: int):
        nonlocal out
        try:
            part = loaded.predict(values[lo:hi], stats=stats)
        except ModelUnavailable as e:  # not these rows' fault (a server down): bisecting cannot help
            errors.update({i: f"{type(e).__name__}: {e}" for i in range(lo, hi)})
            return
        except Exception as e:  # any model failure: isolate it, never lose the rest
            if hi - lo == 1:
                errors[lo] = f"{type(e).__name__}: {e}"
                return
            mid = (lo + hi) // 2
            attempt(lo, mid)
            attempt(mid, hi)
            return
        if out is None:
            out = np.empty((len(values),) + part.shape[1:], part.dtype)
        out[lo:hi] = part

    attempt(0, len(values))
    return out, errors
