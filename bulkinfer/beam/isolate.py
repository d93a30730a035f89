"""Runs a model over many rows and, when it fails, bisects until the failing rows are isolated.

A model failure costs only the rows that cause it (Beam's RunInference loses the whole batch).  A
failure that is not the rows' fault (see `is_infrastructure_failure`) is not bisected and costs no row:
it propagates, the bundle fails and the runner retries it, and nothing is committed for its rows.
"""

from __future__ import annotations

import sys

import numpy as np

from bulkinfer.errors import ModelUnavailable
from bulkinfer.runtime import EngineStats

# XLA statuses that a batch's own rows can cause: out of memory on a too-large batch (the engine backs
# off and retries smaller ones first) and an invalid input.  Any other device error (INTERNAL,
# UNAVAILABLE, DATA_LOSS, ...) means the device or its runtime failed.
ROW_STATUSES = ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT")


def is_infrastructure_failure(error: BaseException) -> bool:
    """True when `error` is not the rows' fault: the model could not be reached (`ModelUnavailable`, e.g.
    a server down past the retry budget) or the device failed (a `jax.errors.JaxRuntimeError` whose status
    is not one of ROW_STATUSES)."""
    if isinstance(error, ModelUnavailable):
        return True
    jax = sys.modules.get("jax")  # a device error can only come from an imported JAX
    if jax is not None and isinstance(error, jax.errors.JaxRuntimeError):
        return not any(status in str(error) for status in ROW_STATUSES)
    return False


def predict_isolating(loaded, values: list, stats: EngineStats):
    """Predictions for all values; if the model fails, bisect until the failing values are isolated.

    Returns (predictions indexed like values, {index: error text} for values that failed alone).
    Raises whatever `is_infrastructure_failure` accepts, at once and without bisecting.
    """
    errors: dict[int, str] = {}
    out: np.ndarray | None = None

    def attempt(lo: int, hi: int):
        nonlocal out
        try:
            part = loaded.predict(values[lo:hi], stats=stats)
        except Exception as e:  # any model failure: isolate it, never lose the rest
            if is_infrastructure_failure(e):
                raise
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
