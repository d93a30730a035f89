"""One loaded model per worker process, shared by its DoFn threads, and the Beam metrics it reports.

    loaded = load_shared(spec)     # in DoFn.setup: the first caller in the process loads, the rest share
    release(spec)                  # drop it (e.g. after measuring a cold start, as `bulkinfer plan` does)
    report_load(spec)              # in a bundle: the load time, once per load
    report_engine_stats(stats)     # after each engine call: batches, tokens, compiles, busy time
"""

from __future__ import annotations

import threading
from typing import Any

from apache_beam.metrics import Metrics

from bulkinfer.beam.batch import NAMESPACE
from bulkinfer.runtime import EngineStats

_loaded: dict[Any, Any] = {}
_load_unreported: set = set()  # loaded models whose load time no bundle has reported yet
_loaded_lock = threading.Lock()


def load_shared(model) -> Any:
    """The process's one loaded instance of `model` (a hashable spec); loads it on first use."""
    with _loaded_lock:
        if model not in _loaded:
            _loaded[model] = model.load()
            _load_unreported.add(model)
        return _loaded[model]


def release(model) -> bool:
    """Drops the process's loaded instance of `model` (its parameters, engine and compiled programs), so
    that the next `load_shared` loads it afresh, as a new worker process would.  True if one was loaded."""
    with _loaded_lock:
        _load_unreported.discard(model)
        return _loaded.pop(model, None) is not None


def report_load(model) -> None:
    """Records the model's load time once per load, from a bundle (metrics need a step context; setup has none)."""
    with _loaded_lock:
        if model not in _load_unreported:
            return
        _load_unreported.discard(model)
    Metrics.distribution(NAMESPACE, "model_load_ms").update(int(getattr(_loaded[model], "load_s", 0.0) * 1000))


def report_engine_stats(stats: EngineStats) -> None:
    """Adds one engine call's counts to the Beam metrics that report.json reads (once per flush, not per row)."""
    for name in ("batches", "real_tokens", "padded_tokens", "compiles", "cache_loads", "oom_backoffs"):
        Metrics.counter(NAMESPACE, name).inc(getattr(stats, name))
    Metrics.counter(NAMESPACE, "engine_ms").inc(int(stats.run_s * 1000))  # wall time inside engine calls
    Metrics.counter(NAMESPACE, "device_busy_ms").inc(int(stats.busy_s * 1000))
