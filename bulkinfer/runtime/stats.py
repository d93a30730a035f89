"""Counters of what the engine ran: rows, batches, tokens, compiles and cache loads, device time, out-of-memory
back-offs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class EngineStats:
    """Counts of one `Engine.run` call, or (`Engine.stats`) of everything an engine ran in this process.

    real_tokens / padded_tokens: tokens of the rows vs. tokens of the padded batches they ran in (packed
      batches: their token capacity, what the token-wise layers compute; attention's [B, L] layout is
      not counted).
    compiles: shapes compiled (each once per process).
    cache_loads: shapes loaded from the executable cache instead (`bulkinfer.runtime.executables`).
    compile_s: seconds spent compiling and loading them.
    run_s: wall seconds inside `Engine.run` (padding, dispatch, waiting for results).
    busy_s: seconds during which the devices had at least one batch running (from dispatch, or the
      previous batch's completion, to this batch's completion); busy_s / wall time is the
      device-busy fraction.
    oom_backoffs: batches that ran out of device memory and were split and rerun with half the budget.
    on_rows: if set, `Engine.run` calls it with each completed batch's row count as the batch completes
      (on the thread that called `run`), for live progress within one long call; not a count, so `add`
      leaves it alone.  Rows of a call that fails, or that an out-of-memory back-off reruns, are
      reported when they complete, so the total may pass the call's row count.
    """

    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    compiles: int = 0
    cache_loads: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0
    busy_s: float = 0.0
    oom_backoffs: int = 0
    on_rows: Callable[[int], None] | None = dataclasses.field(default=None, compare=False, repr=False)

    def add(self, other: EngineStats, *, compiles: bool = True) -> None:
        for f in dataclasses.fields(self):
            if f.name == "on_rows":
                continue
            if compiles or f.name not in ("compiles", "cache_loads", "compile_s"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
