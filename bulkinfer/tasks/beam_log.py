"""Beam's log of a failed bundle, for failures that bulkinfer reports in one line of its own.

Beam's runners log every bundle that raised, with its traceback, before the failure reaches the job.
For bulkinfer's own errors (bad settings, an outage, counts that do not reconcile, too many failed
rows) the job says what happened and what to do in one line, so that traceback is noise unless the
user asked for detail: `quiet_own_errors` drops those records while the root logger is quieter than
INFO (the CLI without -v) and lets every other record through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# The loggers through which Beam's runner and SDK harness report a bundle that raised.
BEAM_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                "apache_beam.runners.portability.fn_api_runner.fn_runner")


class _OwnErrors(logging.Filter):
    def __init__(self, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, self.errors)


@contextlib.contextmanager
def quiet_own_errors(errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Inside the block, Beam's records of a bundle that raised one of `errors` are dropped, unless the
    root logger is at INFO or finer (e.g. `bulkinfer -v`)."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    drop = _OwnErrors(errors)
    loggers = [logging.getLogger(name) for name in BEAM_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
