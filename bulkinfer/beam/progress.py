"""Live progress on a terminal: rows done, rows/s and, when the row count is known, the ETA.

BulkInference calls `advance(n)` as rows leave it, and `computed(n)` as the engine completes each batch of
a flush (thousands of rows, which leave together when the flush ends); the line shows the larger of the
two counts, so it moves during a long flush too.  The counters live in this process, so the line shows
progress for the embedded runner (the default).  Other runners report through Beam metrics and their own
UIs.
"""

from __future__ import annotations

import sys
import threading
import time

_done = 0
_computed = 0  # rows of completed engine batches (a flush's rows leave only once all of them completed)
_tokens = 0  # model tokens (a generator's generated tokens), shown as tokens/s once there are any
_lock = threading.Lock()


def advance(n: int, tokens: int = 0) -> None:
    """n rows left BulkInference (predicted or failed); `tokens` model tokens were generated."""
    global _done, _tokens
    with _lock:
        _done += n
        _tokens += tokens


def computed(n: int) -> None:
    """The engine completed a batch of n rows (`EngineStats.on_rows`)."""
    global _computed
    with _lock:
        _computed += n


class Progress:
    """Prints one refreshing line to stderr while a job runs, if stderr is a terminal.

    Its rows/s, and the ETA from it, count from the first rows the line saw, once a second has passed
    since: before them the job loads the model and compiles, which says nothing of the rate to come.
    clock: seconds, monotonic (default `time.perf_counter`).
    """

    def __init__(self, total: int | None, *, interval: float = 0.5, stream=None, clock=time.perf_counter):
        self._total, self._interval = total, interval
        self._stream = stream or sys.stderr
        self._clock = clock
        self._first: tuple[float, int] | None = None  # (time, rows) when the line first saw rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        global _done, _computed, _tokens
        _done, _computed, _tokens = 0, 0, 0
        self._t0 = self._clock()
        self._first = None
        if self._stream.isatty():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._stream.write("\n")

    def line(self) -> str:
        now = self._clock()
        elapsed = max(now - self._t0, 1e-9)
        n = max(_done, _computed)  # computed rows may pass the rows seen (a failed batch's rows rerun)
        if self._total:
            n = min(n, max(_done, self._total))
        if n and self._first is None:
            self._first = (now, n)
        since, base = self._first or (now, n)
        rate = (n - base) / (now - since) if now - since >= 1.0 and n > base else n / elapsed
        text = f"{n:,} rows  {rate:,.0f} rows/s"
        if self._total:
            text = f"{n:,}/{self._total:,} rows ({100 * n / self._total:.0f}%)  {rate:,.0f} rows/s"
            if rate > 0 and n < self._total:
                text += f"  ETA {_clock((self._total - n) / rate)}"
        if _tokens:
            text += f"  {_tokens / elapsed:,.0f} tokens/s"
        return text

    def _loop(self):
        while not self._stop.wait(self._interval):
            self._stream.write("\r" + self.line().ljust(70))
            self._stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
