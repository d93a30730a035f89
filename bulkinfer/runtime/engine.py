"""The device side: one engine per process runs a pure JAX function over token sequences.

    out = fn(params, input_ids [B, L] int32, mask [B, L] int32) -> [B, ...]

The engine pads rows into the static shapes of a `Bucketing`, compiles each shape once (explicitly,
so a new shape is visible in `stats.compiles`), splits each batch over all local devices along a
"data" mesh axis, and keeps up to `max_in_flight` batches dispatched so host-side padding of the next
batch and the copy back of the previous one overlap the current compute (JAX dispatch is async).
Threads share one engine; `run` is serialized by a lock so the devices see one stream of batches.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bulkinfer.runtime.buckets import Bucketing


@dataclasses.dataclass
class EngineStats:
    rows: int = 0
    batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    compiles: int = 0
    compile_s: float = 0.0
    run_s: float = 0.0

    def add(self, other: EngineStats, *, compiles: bool = True) -> None:
        for f in dataclasses.fields(self):
            if compiles or f.name not in ("compiles", "compile_s"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


class Engine:
    def __init__(
        self,
        fn: Callable,
        params,
        *,
        bucketing: Bucketing,
        pad_id: int = 0,
        max_in_flight: int = 2,
        devices: Sequence[jax.Device] | None = None,
    ):
        devices = list(devices) if devices is not None else jax.local_devices()
        self._mesh = Mesh(np.array(devices), ("data",))
        self._replicated = NamedSharding(self._mesh, PartitionSpec())
        self._batch_sharded = NamedSharding(self._mesh, PartitionSpec("data", None))
        self.bucketing = dataclasses.replace(bucketing, multiple=len(devices))
        self._params = jax.device_put(params, self._replicated)
        # fn's settings are bound by the caller (functools.partial); params are an argument, never a closure.
        self._jitted = jax.jit(
            fn, in_shardings=(self._replicated, self._batch_sharded, self._batch_sharded)
        )
        self._compiled: dict[tuple[int, int], Callable] = {}
        self._pad_id = pad_id
        self._max_in_flight = max(1, max_in_flight)
        self._lock = threading.Lock()
        self.stats = EngineStats()

    @property
    def num_devices(self) -> int:
        return self._mesh.size

    def _executable(self, batch: int, length: int) -> Callable:
        key = (batch, length)
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            spec = jax.ShapeDtypeStruct((batch, length), np.int32, sharding=self._batch_sharded)
            exe = self._jitted.lower(self._params, spec, spec).compile()
            self._compiled[key] = exe
            self.stats.compiles += 1
            self.stats.compile_s += time.perf_counter() - t0
        return exe

    def warmup(self) -> None:
        """Compiles every shape the bucketing allows, so no compile happens while data flows."""
        with self._lock:
            for batch, length in self.bucketing.shapes():
                self._executable(batch, length)

    def run(self, seqs: Sequence[np.ndarray], stats: EngineStats | None = None) -> np.ndarray:
        """Outputs for each token sequence, in input order: [N, ...].

        `stats`, if given, receives this call's counts as well as `self.stats` (which is per process).
        """
        if not seqs:
            raise ValueError("run() needs at least one sequence")
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        plan = self.bucketing.plan(lengths)
        call = EngineStats()
        with self._lock:
            t0 = time.perf_counter()
            compiles, compile_s = self.stats.compiles, self.stats.compile_s
            out = None
            pending: collections.deque = collections.deque()

            def drain_one():
                nonlocal out
                rows, device_out = pending.popleft()
                host = np.asarray(device_out)  # blocks on this batch only
                if out is None:
                    out = np.empty((len(seqs),) + host.shape[1:], host.dtype)
                out[rows] = host[: len(rows)]

            for batch, length, rows in plan:
                ids, mask = self._pad([seqs[i] for i in rows], lengths[rows], batch, length)
                pending.append((rows, self._executable(batch, length)(self._params, ids, mask)))
                call.batches += 1
                call.padded_tokens += batch * length
                if len(pending) > self._max_in_flight:
                    drain_one()
            while pending:
                drain_one()
            call.rows = len(seqs)
            call.real_tokens = int(lengths.sum())
            call.compiles = self.stats.compiles - compiles
            call.compile_s = self.stats.compile_s - compile_s
            call.run_s = time.perf_counter() - t0
            self.stats.add(call, compiles=False)
        if stats is not None:
            stats.add(call)
        return out

    def _pad(self, seqs, lengths, batch: int, length: int):
        # [B, L] ids and mask; rows past len(seqs) are dummy rows with an all-zero mask.
        mask = np.zeros((batch, length), np.int32)
        mask[: len(seqs)] = np.arange(length)[None, :] < lengths[:, None]
        ids = np.full((batch, length), self._pad_id, np.int32)
        ids[mask.astype(bool)] = np.concatenate(seqs)
        return ids, mask
