"""Exceptions shared across layers."""


class ModelUnavailable(RuntimeError):
    """`predict` could not reach the model at all (e.g. a model server down past the retry budget).

    The failure is not the rows' fault, so `BulkInference` sends every row of that call to the
    dead-letter output with this reason at once, instead of bisecting the call to find bad rows.
    """
