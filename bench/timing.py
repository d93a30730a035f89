"""Wall time, this process's CPU time and the machine's load around a measured block."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time


@dataclasses.dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system seconds of this process (all its threads)
    load_before: float = 0.0  # 1-minute load average of the machine when the block started

    @property
    def cores_used(self) -> float:
        """Average cores this process kept busy; below the core count means waiting or contention."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


@contextlib.contextmanager
def timed():
    t = Timing(load_before=os.getloadavg()[0])
    c0, w0 = os.times(), time.perf_counter()
    try:
        yield t
    finally:
        c1 = os.times()
        t.wall_s = time.perf_counter() - w0
        t.cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
