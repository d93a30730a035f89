"""Ctrl-C (SIGINT) while a job's pipeline runs.

Beam's embedded runner runs the bundle in the thread that gets the signal, so the KeyboardInterrupt is
raised inside a DoFn; the runner logs that bundle's traceback as an error and hands the caller a
RuntimeError naming it.  `interruptible` notes the signal itself, so that the job can raise
KeyboardInterrupt again (the caller's convention for Ctrl-C, exit status 130 in the CLI), and keeps the
runner's traceback of the interrupted bundle out of the log.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

from bulkinfer.tasks.beam_log import BEAM_LOGGERS


class Interrupt:
    """Whether SIGINT arrived inside `interruptible`; as a logging filter, drops every record after it."""

    def __init__(self):
        self.requested = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.requested


@contextlib.contextmanager
def interruptible(kept: Callable[[], str] | None = None) -> Iterator[Interrupt]:
    """Yields an `Interrupt` whose `requested` turns True when SIGINT arrives inside the block.

    The signal still raises KeyboardInterrupt where it lands (Python's default handler runs after the
    note is taken).  A KeyboardInterrupt leaving the block is raised again with `kept()` as its text
    (what the interrupted work keeps, e.g. its committed units).  The note and the log filter apply only
    in the main thread and while SIGINT has Python's default handler (or an enclosing block's, which
    notes it too): elsewhere, or under a caller's own handler, `requested` stays False.
    """
    watch = Interrupt()
    loggers = [logging.getLogger(name) for name in BEAM_LOGGERS]
    previous = signal.getsignal(signal.SIGINT)  # Python's default, or an enclosing block's `on_sigint`
    ours = threading.current_thread() is threading.main_thread() and (
        previous is signal.default_int_handler or getattr(previous, "bulkinfer_interruptible", False))

    def on_sigint(signum, frame):
        watch.requested = True
        previous(signum, frame)

    on_sigint.bulkinfer_interruptible = True
    if ours:
        for logger in loggers:
            logger.addFilter(watch)
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield watch
    except KeyboardInterrupt as e:
        if kept is None:
            raise
        raise KeyboardInterrupt(kept()) from e
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)
            for logger in loggers:
                logger.removeFilter(watch)
