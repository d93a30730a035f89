"""Exceptions shared across layers, and which failures are not the rows' fault."""

import sys


class ModelUnavailable(RuntimeError):
    """`predict` could not reach the model at all (e.g. a model server down past the retry budget).

    The failure is not the rows' fault, so `BulkInference` neither bisects the call nor makes its rows
    dead letters: the error propagates, the bundle fails and the runner retries it (see beam/isolate.py).
    """


class BadSettings(ValueError):
    """A job setting that no rerun can fix, found where the model is loaded (a worker's DoFn.setup): e.g. a
    kept field that a model output of the same name would overwrite.  The run job reports it as bad
    settings (the CLI's exit 2), not as a failed wave to resume."""


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
