"""When the devices are busy: a watcher thread that timestamps each batch's completion.

JAX dispatch is asynchronous, so the host learns that a batch finished only when it asks.  The
engine hands every dispatched output to a `BusyClock`, whose thread waits for outputs in dispatch
order and counts, for batch i, the time from max(dispatch_i, completion_{i-1}) to completion_i: the
union of the intervals during which some batch was running.  busy_s / wall time is then the
device-busy fraction, without blocking the dispatching thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import jax


class Ticket:
    """One dispatched batch: `wait()` returns once it completed, then `busy_s` is its share."""

    def __init__(self, output, dispatched: float):
        self.output = output
        self.dispatched = dispatched
        self.busy_s = 0.0
        self.error: BaseException | None = None
        self._done = threading.Event()

    def wait(self) -> None:
        self._done.wait()


class BusyClock:
    """Times dispatched outputs on a watcher thread.

    wait_for: blocks until an output is computed and raises what its batch raised (default
      `jax.block_until_ready`); `bulkinfer.testing.OutOfMemoryWhileRunning` injects failures here.
    idle_exit_s: seconds without outputs after which the watcher thread ends (the next `track` starts
      another), so that a clock, and the engine that held it, can be collected once dropped.
    """

    def __init__(self, wait_for: Callable[[object], object] | None = None, *, idle_exit_s: float = 5.0):
        self._wait_for = wait_for if wait_for is not None else jax.block_until_ready
        self._idle_exit_s = idle_exit_s
        self._queue: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self._last_done = 0.0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def track(self, output) -> Ticket:
        """Starts timing a just-dispatched output (any pytree of jax arrays)."""
        ticket = Ticket(output, time.perf_counter())
        with self._start_lock:  # a watcher ending for idleness checks the queue under this lock
            self._queue.put(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="bulkinfer-busy-clock", daemon=True)
                self._thread.start()
        return ticket

    def _watch(self) -> None:
        while True:
            try:
                ticket = self._queue.get(timeout=self._idle_exit_s)
            except queue.Empty:
                with self._start_lock:
                    if self._queue.empty():  # no `track` since: end; the next one starts a watcher
                        self._thread = None
                        return
                continue
            try:
                self._wait_for(ticket.output)
            except Exception as e:  # surfaced to the engine by Ticket.error, where it is handled
                ticket.error = e
            done = time.perf_counter()
            ticket.busy_s = max(0.0, done - max(ticket.dispatched, self._last_done))
            self._last_done = max(self._last_done, done)
            ticket._done.set()
