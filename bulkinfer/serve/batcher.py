"""Dynamic batching: concurrent requests merged into one model call by a single batcher thread.

    batcher = DynamicBatcher(loaded.predict, max_batch_rows=1024, max_queue_delay_s=0.005)
    out = batcher.submit({"text": ["a", "b"]}).result()   # {"embedding": [2, dim]}, from a shared call

A request is the model contract's input (`bulkinfer.models.signature`): {input name: N rows' values},
arrays [N, ...] or lists; the merged call gets each input's arrays concatenated and lists joined, and
each request gets its rows of every output back.  (A plain list of values, with an array [N, ...] as
the result, works the same way.)

The batcher waits up to `max_queue_delay_s` for more requests to arrive (or until `max_batch_rows`
rows are queued), then runs them as one call.  The window starts when the oldest queued request
arrived or when the previous model call ended, whichever is later.  The second matters under load:
the clients answered by one call send their next requests a moment after it ends, and without the
window the next call would start at once with only the requests that queued meanwhile.  With a fixed
number of clients the calls then alternate between two partial groups (with 16 clients x 64 rows,
about 192 and 832 rows) instead of one full group, and a small call pads its length buckets far more
(MiniLM on synthetic text: padding efficiency 0.58 for 256-row calls vs 0.84 for 1,024; see
BENCHMARKS.md, "Remote mode").  A client's turnaround is often longer than `max_queue_delay_s`, so
each request also names its `source` (the server passes its connection): after a call, the batcher
also waits for the sources that call answered to send their next request (or be `forget`-ten, as a
closed connection is), for at most `RETURN_WAIT_FRACTION` of that call's duration.  That bounds what
waiting for a client that never returns can cost the model, while a turnaround of tens of ms no
longer splits the calls.  A request larger than `max_batch_rows` runs alone.  If a merged call fails, each of its requests is
retried alone so that one bad request cannot fail the others.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

import numpy as np

log = logging.getLogger(__name__)

# After a call, how long the batcher waits at most for the sources it answered to send their next
# request, as a fraction of that call's duration: the model idles at most this much longer per call.
RETURN_WAIT_FRACTION = 0.05


class Overloaded(RuntimeError):
    """More rows are queued than `max_queue_rows`; the client should back off and retry (HTTP 429)."""


class Closed(RuntimeError):
    """The batcher is shutting down and takes no new requests (HTTP 503)."""


@dataclasses.dataclass
class BatcherStats:
    requests: int = 0  # requests answered
    rows: int = 0  # rows answered
    calls: int = 0  # model calls (a merged call counts once)
    failed_requests: int = 0


@dataclasses.dataclass
class _Item:
    values: Mapping[str, np.ndarray | list] | Sequence
    rows: int
    future: Future
    arrived: float
    source: object = None  # who sent it (the server's connection), or None


def rows_of(values: Mapping[str, np.ndarray | list] | Sequence) -> int:
    """N: the rows of a request, {input: N values} or a list of N values."""
    if isinstance(values, Mapping):
        return len(next(iter(values.values()))) if values else 0
    return len(values)


def merge(parts: list) -> Mapping[str, np.ndarray | list] | list:
    """Several requests' inputs as one: each input's arrays concatenated (lists joined), in order."""
    if not isinstance(parts[0], Mapping):
        return [v for part in parts for v in part]
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for name in parts[0]:
        values = [part[name] for part in parts]
        if all(isinstance(v, np.ndarray) for v in values):
            merged[name] = np.concatenate(values)
        else:
            merged[name] = [x for v in values for x in v]
    return merged


def _check_rows(out, n: int) -> None:
    """RuntimeError unless `out` holds n rows: an array [n, ...] or a dict of them."""
    arrays = out.items() if isinstance(out, Mapping) else [(None, out)]
    for name, array in arrays:
        which = f" of output {name!r}" if name is not None else ""
        if not hasattr(array, "shape") and hasattr(array, "__len__") and len(array) == n:
            raise RuntimeError(f"the model returned a {type(array).__name__}{which}; expected an array [{n}, ...]")
        if not hasattr(array, "shape") or len(array) != n:
            got = len(array) if hasattr(array, "__len__") else type(array).__name__
            raise RuntimeError(f"the model returned {got} rows{which} for {n} inputs")


class DynamicBatcher:
    def __init__(self, predict: Callable[[list], np.ndarray], *, max_batch_rows: int = 1024,
                 max_queue_delay_s: float = 0.005, max_queue_rows: int = 65536, clock=time.monotonic):
        if max_batch_rows < 1 or max_queue_delay_s < 0 or max_queue_rows < 1:
            raise ValueError("max_batch_rows and max_queue_rows must be >= 1 and max_queue_delay_s >= 0")
        self._predict = predict
        self._max_rows, self._delay, self._max_queued = max_batch_rows, max_queue_delay_s, max_queue_rows
        self._clock = clock
        self._cv = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._closed = False
        self._last_call_end = float("-inf")  # clock() when the previous model call ended
        self._in_call: set = set()  # sources of the call running now
        self._gone: set = set()  # forgotten sources that the running call or a queued request still names
        self._return_by = float("-inf")  # until when to wait for the sources the previous call answered
        self._returning: set = set()  # those sources that have not sent their next request yet
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._loop, name="bulkinfer-batcher", daemon=True)
        self._thread.start()

    def submit(self, values: Mapping[str, np.ndarray | list] | Sequence, source: object = None) -> Future:
        """A future of predict(values): {output: [N, ...]} (or [N, ...] for a list of values).

        values: {input name: N rows' values} (all inputs the same N), or a list of N values.
        source: a hashable that identifies the sender (a connection), so that the batcher can wait for
          it after answering it (see the module docstring); None: never waited for.
        Raises Overloaded or Closed instead of queueing.
        """
        future: Future = Future()
        rows = rows_of(values)
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._queued_rows and self._queued_rows + rows > self._max_queued:
                raise Overloaded(f"{self._queued_rows} rows are already queued (limit {self._max_queued}); retry later")
            self._queue.append(_Item(values, rows, future, self._clock(), source))
            self._queued_rows += rows
            self._returning.discard(source)
            self._cv.notify()
        return future

    def forget(self, source: object) -> None:
        """`source` sends nothing more (its connection closed): the batcher no longer waits for it, also when
        the call that answered it has not finished its bookkeeping yet."""
        with self._cv:
            if source in self._in_call or any(item.source == source for item in self._queue):
                self._gone.add(source)  # a call can still answer it: not waited for after that call
            if source in self._returning:
                self._returning.discard(source)
                self._cv.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests; answers every queued one, then the thread ends."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Item] | None:
        """The next group of requests to run together, or None when closed and drained."""
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            deadline = max(self._queue[0].arrived, self._last_call_end) + self._delay
            while self._queued_rows < self._max_rows and not self._closed:
                until = max(deadline, self._return_by) if self._returning else deadline
                remaining = until - self._clock()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            group, rows = [], 0
            while self._queue and (not group or rows + self._queue[0].rows <= self._max_rows):
                item = self._queue.popleft()
                group.append(item)
                rows += item.rows
            self._queued_rows -= rows
            self._in_call = {item.source for item in group if item.source is not None}
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            start = self._clock()
            try:
                self._run(group)
            except BaseException as e:  # noqa: BLE001 -- never strand a request, never lose the thread
                log.exception("the batcher failed on %d requests", len(group))
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            with self._cv:
                self._last_call_end = self._clock()
                self._return_by = self._last_call_end + RETURN_WAIT_FRACTION * (self._last_call_end - start)
                # Sources answered by this call that have not already sent their next request.
                queued = {item.source for item in self._queue}
                self._returning = {item.source for item in group if item.source is not None} - queued - self._gone
                self._gone &= queued  # a closed source with a request still queued is skipped after that call too
                self._in_call = set()

    def _run(self, group: list[_Item]) -> None:
        n = sum(item.rows for item in group)
        try:
            out = self._predict(merge([item.values for item in group]))  # {output: [n, ...]} or [n, ...]
            _check_rows(out, n)
        except Exception as e:  # noqa: BLE001 -- answered to the requests, never lost
            if len(group) > 1:
                log.warning("a merged call of %d requests failed (%s); running them one by one", len(group), e)
                for item in group:
                    self._run([item])
                return
            self.stats.failed_requests += 1
            group[0].future.set_exception(e)
            return
        self.stats.calls += 1
        start = 0
        for item in group:
            end = start + item.rows
            self.stats.requests += 1  # counted before the reply, so a client's own request shows in /stats
            self.stats.rows += item.rows
            mine = ({name: array[start:end] for name, array in out.items()} if isinstance(out, Mapping)
                    else out[start:end])
            item.future.set_result(mine)
            start = end
