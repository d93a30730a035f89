"""Live progress on a terminal: rows done, rows/s and, when the row count is known, the ETA.

BulkInference calls `advance(n)` as rows leave it; the counter lives in this process, so the line shows progress for the
embedded runner (the default).  Other runners report through Beam metrics and their own UIs.
"""

from __future__ import annotations

import sys
import threading
import time

_done = 0
_tokens = 0  # model tokens (a generator's generated tokens), shown as tokens/s once there are any
_lock = threading.Lock()


def advance(n: int, tokens: int = 0) -> None:
    global _done, _tokens
    with _lock:
        _done += n
        _tokens += tokens


class Progress:
    """Prints one refreshing line to stderr while a job runs, if stderr is a terminal."""

    def __init__(self, total: int | None, *, interval: float = 0.5, stream=None):
        self._total, self._interval = total, interval
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        global _done, _tokens
        _done, _tokens = 0, 0
        self._t0 = time.perf_counter()
        if self._stream.isatty():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._stream.write("\n")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        n = _done
        rate = n / elapsed
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
