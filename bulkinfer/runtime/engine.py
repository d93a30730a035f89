"""The device side: one engine per process runs a pure JAX function over token sequences.

    out = fn(params, input_ids [B, L] int32, mask [B, L] int32) -> [B, ...]

The engine pads rows into the static shapes of a `Bucketing`, compiles each shape once (explicitly,
so a new shape is visible in `stats.compiles`), splits each batch over the "data" axis of a device
mesh (and, with `model_parallel > 1`, the parameters over its "model" axis), and keeps
`max_in_flight` batches dispatched ahead of the one whose result it waits for.  JAX dispatch is asynchronous (on CPU too), so while batch i
computes the host pads batch i+1, and batch i-1's result is already on its way back
(`copy_to_host_async` right after dispatch) before the host asks for it.

When a batch runs out of device memory (at compile or at run time) the engine halves the token budget
for the rest of the run (`Bucketing.halved`: same lengths, half the batch sizes), replans that batch's
rows with it and runs them again; nothing is lost, and `stats.oom_backoffs` counts it.

Threads share one engine; `run` is serialized by a lock, so the devices see one stream of batches.
Rows of concurrent callers are not merged into shared batches: each BulkInference flush brings
thousands of rows, enough for full batches, and the padding that merging could save is bounded by
the tails of one flush (bench/padding.py: 0.909 per 8192-row flush vs. 0.927 with no tails at all),
while it would couple one caller's latency and failures to another's.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from bulkinfer.runtime import sharding
from bulkinfer.runtime.buckets import Bucketing
from bulkinfer.runtime.busy import BusyClock
from bulkinfer.runtime.stats import EngineStats

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-memory failures (a JaxRuntimeError whose status is RESOURCE_EXHAUSTED)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@dataclasses.dataclass
class _InFlight:
    rows: np.ndarray  # [n] indices into the caller's sequences
    shape: tuple[int, int]  # (batch, length)
    budget: int  # token budget of the bucketing that planned it
    ticket: object  # busy.Ticket


class Engine:
    """Runs `fn` over token sequences in bucketed, sharded, pipelined batches.

    fn: pure function (params, input_ids [B, L], mask [B, L]) -> [B, ...]; settings bound with
      functools.partial, parameters passed as an argument (never captured in a closure).
    bucketing: the shapes it may run; its `multiple` is set to the number of data-parallel devices.
    devices: the devices to use (default: all local devices).
    model_parallel: size of the mesh's "model" axis; the data axis gets the rest of the devices.
    param_spec: (path, leaf) -> PartitionSpec splitting a parameter along "model" (or None to
      replicate it); needed when model_parallel > 1, e.g. `bert.param_spec`.
    """

    def __init__(
        self,
        fn: Callable,
        params,
        *,
        bucketing: Bucketing,
        pad_id: int = 0,
        max_in_flight: int = 2,
        devices: Sequence[jax.Device] | None = None,
        model_parallel: int = 1,
        param_spec: sharding.ParamSpec | None = None,
    ):
        if model_parallel > 1 and param_spec is None:
            raise ValueError(f"model_parallel={model_parallel} needs a param_spec saying how to split parameters")
        self._mesh = sharding.make_mesh(devices, model_parallel)
        self.bucketing = dataclasses.replace(bucketing, multiple=self._mesh.shape[sharding.DATA])
        param_shardings = sharding.param_shardings(params, self._mesh, param_spec)
        self._batch_sharded = sharding.batch_sharding(self._mesh)
        self._params = jax.device_put(params, param_shardings)
        # Static: the shape of each batch (one executable per shape).  Dynamic: params, ids, mask.
        self._jitted = jax.jit(fn, in_shardings=(param_shardings, self._batch_sharded, self._batch_sharded))
        self._compiled: dict[tuple[int, int], Callable] = {}
        self._pad_id = pad_id
        self._max_in_flight = max(1, max_in_flight)
        self._lock = threading.Lock()
        self._clock = BusyClock()
        self.stats = EngineStats()

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self._mesh.shape)

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
        """Compiles every shape the bucketing allows, so no compile happens while data flows.

        A shape that does not fit in device memory at compile time halves the budget, as in `run`.
        """
        with self._lock:
            done = False
            while not done:
                try:
                    for batch, length in self.bucketing.shapes():
                        self._executable(batch, length)
                    done = True
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    self._back_off(self.bucketing.token_budget, (batch, length), e, self.stats)

    def run(self, seqs: Sequence[np.ndarray], stats: EngineStats | None = None) -> np.ndarray:
        """Outputs for each token sequence, in input order: [N, ...].

        `stats`, if given, receives this call's counts as well as `self.stats` (which is per process).
        """
        if not seqs:
            raise ValueError("run() needs at least one sequence")
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        if lengths.min() < 1:
            row = int(np.argmin(lengths))
            raise ValueError(f"sequence {row} is empty; every row needs at least one token")
        call = EngineStats()
        with self._lock:
            t0 = time.perf_counter()
            compiles, compile_s = self.stats.compiles, self.stats.compile_s
            out = self._run_locked(seqs, lengths, call)
            call.rows = len(seqs)
            call.real_tokens = int(lengths.sum())
            call.compiles = self.stats.compiles - compiles
            call.compile_s = self.stats.compile_s - compile_s
            call.run_s = time.perf_counter() - t0
            self.stats.add(call, compiles=False)
        if stats is not None:
            stats.add(call)
        return out

    def _run_locked(self, seqs, lengths: np.ndarray, call: EngineStats) -> np.ndarray:
        out: np.ndarray | None = None
        todo = collections.deque([np.arange(len(seqs))])  # groups of rows still to plan and run
        pending: collections.deque[_InFlight] = collections.deque()

        def drain_one():
            nonlocal out
            job = pending.popleft()
            job.ticket.wait()
            error = job.ticket.error
            if error is not None:
                if not is_out_of_memory(error):
                    raise error
                self._back_off(job.budget, job.shape, error, call)
                todo.append(job.rows)
                return
            host = np.asarray(job.ticket.output)  # [B, ...]; already copied, does not block
            if out is None:
                out = np.empty((len(seqs),) + host.shape[1:], host.dtype)
            out[job.rows] = host[: len(job.rows)]
            call.batches += 1
            call.padded_tokens += job.shape[0] * job.shape[1]
            call.busy_s += job.ticket.busy_s

        while todo or pending:
            if not todo:
                drain_one()
                continue
            group = todo.popleft()
            bucketing = self.bucketing
            plan = bucketing.plan(lengths[group])
            for k, (batch, length, idx) in enumerate(plan):
                rows = group[idx]
                try:
                    exe = self._executable(batch, length)
                    ids, mask = self._pad([seqs[i] for i in rows], lengths[rows], batch, length)
                    output = exe(self._params, ids, mask)  # async: returns before the batch is computed
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    self._back_off(bucketing.token_budget, (batch, length), e, call)
                    # This batch and the rest of the plan were cut for the old budget: replan them.
                    todo.append(np.concatenate([rows] + [group[rest] for _, _, rest in plan[k + 1:]]))
                    break
                output.copy_to_host_async()
                pending.append(_InFlight(rows, (batch, length), bucketing.token_budget, self._clock.track(output)))
                if len(pending) > self._max_in_flight:
                    drain_one()
        return out

    def _back_off(self, budget: int, shape: tuple[int, int], error: BaseException, call: EngineStats) -> None:
        """After an out-of-memory failure of a batch planned with `budget`: halve the budget (once per budget)."""
        call.oom_backoffs += 1
        if budget != self.bucketing.token_budget:  # an earlier failure already lowered it
            log.warning("out of device memory on a %d x %d batch; rerunning its rows at token_budget %d",
                        *shape, self.bucketing.token_budget)
            return
        half = self.bucketing.halved()
        if half is None:
            raise RuntimeError(
                f"out of device memory on a {shape[0]} x {shape[1]} batch even at token_budget {budget}, "
                f"the smallest that fits the longest bucket ({self.bucketing.lengths[-1]}); use a shorter "
                f"max_length, more devices with model_parallel, or a device with more memory") from error
        log.warning("out of device memory on a %d x %d batch (token_budget %d); halving the token budget "
                    "to %d for the rest of the run and rerunning its rows: %s",
                    *shape, budget, half.token_budget, str(error).splitlines()[0][:200])
        self.bucketing = half

    def _pad(self, seqs, lengths, batch: int, length: int):
        # [B, L] ids and mask; rows past len(seqs) are dummy rows with an all-zero mask.
        mask = np.zeros((batch, length), np.int32)
        mask[: len(seqs)] = np.arange(length)[None, :] < lengths[:, None]
        ids = np.full((batch, length), self._pad_id, np.int32)
        ids[mask.astype(bool)] = np.concatenate(seqs)
        return ids, mask
