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

log = logging.getLogger(__name__)


class Interrupt:
    """Whether SIGINT arrived inside `interruptible`; as a logging filter, drops the records of the
    interrupted bundle (those naming a KeyboardInterrupt) once it did."""

    def __init__(self):
        self.requested = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.requested:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in str(record.msg))


def was_interrupted(watch: Interrupt, error: BaseException) -> bool:
    """Whether a pipeline failure is the Ctrl-C `watch` noted: SIGINT arrived and the failure names a
    KeyboardInterrupt (in its chain or its text; runners hand it back as a RuntimeError naming it).  A
    failure after a swallowed SIGINT (Python ignores exceptions raised in finalizers) is not one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in f"{error}":
            return watch.requested
        error = error.__cause__ or error.__context__
    return False


def cancel(result) -> None:
    """Cancels a pipeline a runner still runs (a cluster runner's job outlives the launcher's wait);
    logs when the runner cannot.  `result`: what `Pipeline.run` returned, or None."""
    if result is None:
        return
    try:
        result.cancel()
    except Exception as e:  # noqa: BLE001 -- the embedded runner cannot cancel a finished pipeline
        log.warning("could not cancel the pipeline on its runner (%s: %s); it may still be running: cancel "
                    "it there before rerunning", type(e).__name__, e)


def run_interruptibly(p, *, kept: Callable[[], str], failed: Callable[[Exception], Exception]):
    """Runs pipeline `p` to completion and returns its PipelineResult.  Ctrl-C: cancels it where a runner
    still runs it and raises KeyboardInterrupt with `kept()` as its text; any other failure raises
    `failed(error)` from it."""
    with interruptible(kept) as interrupt:
        result = None
        try:
            result = p.run()
            result.wait_until_finish()
        except KeyboardInterrupt:
            cancel(result)
            raise
        except Exception as e:  # noqa: BLE001 -- any pipeline failure: say what failed
            if was_interrupted(interrupt, e):
                cancel(result)
                raise KeyboardInterrupt from e
            raise failed(e) from e
    return result


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
    try:
        if ours:
            for logger in loggers:
                logger.addFilter(watch)
            signal.signal(signal.SIGINT, on_sigint)
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
