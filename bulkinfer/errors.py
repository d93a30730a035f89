"""Exceptions shared across layers."""


class ModelUnavailable(RuntimeError):
    """`predict` could not reach the model at all (e.g. a model server down past the retry budget).

    The failure is not the rows' fault, so `BulkInference` neither bisects the call nor makes its rows
    dead letters: the error propagates, the bundle fails and the runner retries it (see beam/isolate.py).
    """
