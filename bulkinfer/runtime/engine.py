"""The device side: one engine per process runs a pure JAX function over named array inputs.

    out = fn(params, batch) -> [B, ...] or {name: [B, ...]}
    batch = {name: [B, *shape] for each input} (+ "mask" [B, L] int32 when an input has a variable axis)

    >>> def classify(params, batch):                       # batch["pixels"]: [B, 8, 8] float32
    ...     return {"probs": jax.nn.softmax(batch["pixels"].reshape(-1, 64) @ params["w"])}
    >>> engine = Engine(classify, {"w": w}, inputs={"pixels": ((8, 8), "float32")},
    ...                 bucketing=Bucketing.for_rows(batch_size=256))
    >>> engine.run({"pixels": images})["probs"].shape     # images: [N, 8, 8]
    (N, 10)

Each input declares its per-row shape and dtype; `None` marks a variable axis (at most one per input,
shared by every input that has one: a token sequence, a clip of frames).  With a variable axis the
engine pads rows into the (batch, length) shapes of a `Bucketing` over lengths; without one it plans by
rows alone (`Bucketing.for_rows`: a full batch size and a few halvings, the last batch padded up to the
smallest that holds it).  It compiles each shape once (explicitly, so a new shape is visible in
`stats.compiles`), splits every input's leading axis over the "data" axis of a device mesh (and, with
`model_parallel > 1`, the parameters over its "model" axis), and keeps `max_in_flight` batches
dispatched ahead of the one whose result it waits for.  Each batch in flight is padded and dispatched
by a thread of its own.  Dispatch is asynchronous, so while batch i computes, batch i+1 is padded and
batch i-1's result is already on its way back (`copy_to_host_async` right after dispatch).  On the
CPU the threads matter more: XLA:CPU runs the batches of one dispatching thread one after another,
those of several threads at once, so the batches in flight fill the cores that one batch's serial
stretches leave idle (RUNTIME.md section 2; `max_in_flight=0` runs one batch at a time).

When a batch runs out of device memory (at compile or at run time) the engine halves the token budget
for the rest of the run (`Bucketing.halved`: same lengths, half the batch sizes), replans that batch's
rows with it and runs them again; nothing is lost, and `stats.oom_backoffs` counts it.

Each executable is compiled with `process.compiler_options` for the devices' platform (on CPU, YNNPACK
dot fusion for padded batches; RUNTIME.md sections 7 and 9); the user's own XLA_FLAGS win, BULKINFER_XLA_DEFAULTS=0 turns them off,
and a jaxlib that refuses them compiles with XLA's defaults (a warning says so).

Threads share one engine; `run` is serialized by a lock, so the devices see one caller's batches at a time.
Rows of concurrent callers are not merged into shared batches: each BulkInference flush brings
thousands of rows, enough for full batches, and the padding that merging could save is bounded by
the tails of one flush (bench/padding.py: 0.909 per 8192-row flush vs. 0.927 with no tails at all),
while it would couple one caller's latency and failures to another's.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from bulkinfer.runtime import executables, process, sharding
from bulkinfer.runtime import inputs as _inputs
from bulkinfer.runtime.buckets import Bucketing
from bulkinfer.runtime.busy import BusyClock
from bulkinfer.runtime.stats import EngineStats

log = logging.getLogger(__name__)


def _abandon(pending) -> None:
    """After `run` failed: batches not yet started are cancelled, and the call waits for the started ones
    to finish (their results and errors unread), so that none still holds device memory, or a dispatch
    thread, when it returns."""
    for job in pending:
        job.future.cancel()
    for job in pending:
        if job.future.cancelled():
            continue
        try:
            job.future.result().wait()
        except Exception:  # noqa: BLE001 -- the error that ended the run is the one raised
            pass


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-memory failures (a JaxRuntimeError whose status is RESOURCE_EXHAUSTED)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@dataclasses.dataclass
class _InFlight:
    rows: np.ndarray  # [n] indices into the caller's rows
    shape: tuple  # (batch, length), or (batch, length, tokens) when packed
    budget: int  # token budget of the bucketing that planned it
    future: Future  # of its busy.Ticket: a dispatch thread pads it, calls the executable and tracks it


class Engine:
    """Runs `fn` over named array inputs in bucketed, sharded, pipelined batches.

    fn: pure function (params, batch) -> [B, ...] array or dict of them.  `batch` holds every input
      padded to [B, *shape] (the variable axis padded to the bucket length L with its pad value), plus
      batch["mask"] [B, L] int32 (1 = a real position) when some input has a variable axis.  Filler
      rows (up to a batch size on the ladder) hold pad values and a zero mask; their outputs are
      dropped.  Settings are bound with functools.partial; parameters are passed as an argument
      (never captured in a closure).
    params: pytree of arrays, placed on the devices once.
    inputs: per input name, (per-row shape, numpy dtype name), e.g. {"pixels": ((8, 8), "float32")} or
      {"input_ids": ((None,), "int32")}.  None marks a variable axis (at most one per input); every
      input with one shares the row's length on it.  The name "mask" is reserved.
    bucketing: the shapes it may run; its `multiple` is set to the number of data-parallel devices.
      Without a variable axis it must be `Bucketing.for_rows(...)` (lengths (1,): rows alone).
    pad_values: per input, the value of padded positions and filler rows (default 0).
    output_name: the key of a single-array output in `run`'s result.
    max_in_flight: batches dispatched ahead of the one whose result the host waits for, each by a
      thread of its own (on the CPU they compute at once); 0 runs one batch at a time.
    devices: the devices to use (default: all local devices).
    model_parallel: size of the mesh's "model" axis; the data axis gets the rest of the devices.
    param_spec: (path, leaf) -> PartitionSpec splitting a parameter along "model" (or None to
      replicate it); needed when model_parallel > 1, e.g. `bert.param_spec`.
    clock: watches dispatched batches for completion and device time: anything with a thread-safe
      `track(output) -> busy.Ticket`, called on the dispatch threads (default: a `BusyClock`);
      `bulkinfer.testing.OutOfMemoryWhileRunning` fails batches while they run, as a device out of memory does.
    packed: run padding-free batches (`Bucketing.pack`): each variable-axis input arrives as its rows'
      tokens end to end, [T, *rest], with batch["token_index"] [B, L], batch["row_ids"] [T] and
      batch["positions"] [T] int32 saying where each token belongs (`inputs.pack`), and `fn` must still
      return [B, ...] per row.  Token-wise layers then compute no padding; only the [B, L] layout `fn`
      gathers for attention does.  Needs every variable axis to be axis 0 and one device on the mesh's
      data axis.
    executable_cache: an `executables.ExecutableCache` whose code key identifies `fn`: a shape found there
      is loaded without tracing or lowering (a warm process's fast start), a new one is stored after its
      compile.  None: every shape is traced and lowered (JAX's own persistent cache, if set, still
      skips the XLA compile).

    Raises ValueError for a bad input declaration, a negative max_in_flight, and for a fixed-shape-only
    model given a bucketing over lengths.
    """

    def __init__(
        self,
        fn: Callable,
        params,
        *,
        inputs: _inputs.InputSpec,
        bucketing: Bucketing,
        pad_values: Mapping[str, float | int] | None = None,
        output_name: str = "output",
        max_in_flight: int = 2,
        devices: Sequence[jax.Device] | None = None,
        model_parallel: int = 1,
        param_spec: sharding.ParamSpec | None = None,
        clock=None,
        executable_cache: executables.ExecutableCache | None = None,
        packed: bool = False,
    ):
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        if model_parallel > 1 and param_spec is None:
            raise ValueError(f"model_parallel={model_parallel} needs a param_spec saying how to split parameters")
        self._inputs = _inputs.parse(inputs, pad_values)
        self._variable = [i for i in self._inputs if i.axis is not None]
        if not self._variable and bucketing.lengths != (1,):
            raise ValueError(
                f"no input has a variable axis, so batches are planned by rows alone, but the bucketing has "
                f"lengths {bucketing.lengths}; use Bucketing.for_rows(batch_size=...)")
        self._output_name = output_name
        self._mesh = sharding.make_mesh(devices, model_parallel)
        if packed:
            bad = [i.name for i in self._inputs if i.axis not in (None, 0)]
            if not self._variable or bad:
                raise ValueError(f"packed=True needs inputs whose variable axis is their first (tokens); "
                                 f"{bad or 'no input has a variable axis'}")
            if self._mesh.shape[sharding.DATA] > 1:
                raise ValueError(f"packed=True runs on one device per model replica; this mesh splits rows over "
                                 f"{self._mesh.shape[sharding.DATA]} devices (use packed=False)")
        self.packed = packed
        self.bucketing = dataclasses.replace(bucketing, multiple=self._mesh.shape[sharding.DATA])
        param_shardings = sharding.param_shardings(params, self._mesh, param_spec)
        self._rows_sharded = sharding.batch_sharding(self._mesh)
        self._params = jax.device_put(params, param_shardings)
        # Static: the shape of each batch (one executable per (batch, length)).  Dynamic: params, batch.
        self._jitted = jax.jit(fn, in_shardings=(param_shardings, self._rows_sharded))
        # XLA options per executable for this platform (process.compiler_options; the user's XLA_FLAGS win).
        self.compiler_options = process.compiler_options(self._mesh.devices.flat[0].platform, os.environ,
                                                         packed=packed)
        self._compiled: dict[tuple[int, int, int | None], Callable] = {}  # (batch, length, tokens or None)
        self._row_shapes: dict[str, tuple[int, ...]] | None = None  # per-row output shapes, from the first compile
        self._max_in_flight = max_in_flight
        self._dispatchers: list[ThreadPoolExecutor] = []
        self._submitted = 0  # batches handed to dispatch threads, ever
        self._lock = threading.Lock()
        self._clock = clock if clock is not None else BusyClock()
        self._executables = executable_cache
        self.stats = EngineStats()

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self._mesh.shape)

    def batch_spec(self, batch: int, length: int, tokens: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The `batch` argument `fn` gets for one shape: {name: ShapeDtypeStruct [batch, ...]}; with
        `tokens` (packed), variable-axis inputs are [tokens, ...] and the packed keys are added."""
        def struct(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self._rows_sharded)

        spec = {i.name: struct((tokens,) + i.shape[1:] if tokens and i.axis is not None else
                               i.batch_shape(batch, length), i.dtype) for i in self._inputs}
        if self._variable:
            spec[_inputs.MASK] = struct((batch, length), np.int32)
        if tokens:
            spec[_inputs.TOKEN_INDEX] = struct((batch, length), np.int32)
            spec[_inputs.ROW_IDS] = spec[_inputs.POSITIONS] = struct((tokens,), np.int32)
        return spec

    def shapes(self) -> list[tuple]:
        """Every shape `run` may compile: (batch, length), or (batch, length, tokens) when packed."""
        return self.bucketing.packed_shapes() if self.packed else self.bucketing.shapes()

    def _executable(self, batch: int, length: int, tokens: int | None = None) -> Callable:
        key = (batch, length, tokens)
        exe = self._compiled.get(key)
        if exe is None:
            t0 = time.perf_counter()
            spec = self.batch_spec(batch, length, tokens)
            if self._executables is not None:
                exe = self._executables.load(self._key_parts(spec), list(self._mesh.devices.flat))
            if exe is None:
                exe = self._compile(spec)
                self.stats.compiles += 1
                if self._executables is not None:  # keyed by the options it compiled with (they may be refused)
                    self._executables.store(self._key_parts(spec), exe)
            else:
                self.stats.cache_loads += 1
            self._check_outputs(exe.out_info, batch)
            self._compiled[key] = exe
            self.stats.compile_s += time.perf_counter() - t0
        return exe

    def _key_parts(self, spec: dict[str, jax.ShapeDtypeStruct]) -> dict[str, str]:
        return executables.key_parts(params=self._params, batch_spec=spec, mesh=self._mesh,
                                     compiler_options=self.compiler_options, environ=os.environ)

    def _compile(self, spec: dict[str, jax.ShapeDtypeStruct]):
        """Traces, lowers and compiles `fn` for one batch spec with `compiler_options`."""
        lowered = self._jitted.lower(self._params, spec)
        try:
            return lowered.compile(compiler_options=self.compiler_options or None)
        except jax.errors.JaxRuntimeError as e:
            if not self.compiler_options or "INVALID_ARGUMENT" not in str(e):
                raise
            # A jaxlib that does not know an option (or one of its values): XLA's own defaults instead.
            # Compiled first, so that a model's own INVALID_ARGUMENT error is raised, not blamed on options.
            exe = lowered.compile()
            log.warning("this jaxlib refuses the XLA options %s (%s); compiling with XLA's defaults",
                        self.compiler_options, str(e).splitlines()[0][:200])
            self.compiler_options = {}
            return exe

    def output_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per output name, its per-row shape and numpy dtype name, like `inputs`: e.g.
        {"probs": ((10,), "float32"), "label": ((), "int32")}.  Traces `fn` once on the smallest
        batch shape (no compile, nothing runs).  Raises ValueError for an output that is not [B, ...]."""
        batch, *shape = min(self.shapes())
        info = jax.eval_shape(self._jitted, self._params, self.batch_spec(batch, *shape))
        self._check_outputs(info, batch)
        outs = info if isinstance(info, dict) else {self._output_name: info}
        return {name: (tuple(v.shape[1:]), np.dtype(v.dtype).name) for name, v in outs.items()}

    def _check_outputs(self, out_info, batch: int) -> None:
        """Every output is [batch, ...] and has the same per-row shape in every compiled shape."""
        outs = out_info if isinstance(out_info, dict) else {self._output_name: out_info}
        shapes = {}
        for name, info in outs.items():
            if not isinstance(info, jax.ShapeDtypeStruct):
                raise ValueError(f"fn returned {type(info).__name__} under {name!r}; it must return an array "
                                 f"[B, ...] or a flat dict of them")
            if not info.shape or info.shape[0] != batch:
                raise ValueError(f"output {name!r} has shape {info.shape} for a batch of {batch} rows; every "
                                 f"output must be [B, ...], one entry per row")
            shapes[name] = tuple(info.shape[1:])
        if self._row_shapes is None:
            self._row_shapes = shapes
        elif shapes != self._row_shapes:
            raise ValueError(f"per-row output shapes {shapes} differ from {self._row_shapes} in another batch "
                             f"shape; an output must not depend on the bucket length (pool over the variable axis)")

    def warmup(self) -> None:
        """Compiles every shape the bucketing allows, so no compile happens while data flows.

        A shape that does not fit in device memory at compile time halves the budget, as in `run`.
        """
        with self._lock:
            done = False
            while not done:
                try:
                    for shape in self.shapes():
                        self._executable(*shape)
                    done = True
                except Exception as e:
                    if not is_out_of_memory(e):
                        raise
                    self._back_off(self.bucketing.token_budget, shape, e, self.stats)

    def run(self, inputs: Mapping[str, np.ndarray | Sequence[np.ndarray]],
            stats: EngineStats | None = None) -> dict[str, np.ndarray]:
        """Outputs for each row, in input order: {output name: [N, ...]} (a single array is `output_name`).

        inputs: every declared input: a fixed-shape one as an array [N, *shape] (or N arrays of that
          shape), a variable-axis one as a sequence of N arrays.  Values are cast to the declared dtype
          when numpy's "same_kind" casting allows it (float64 -> float32, int64 -> int32).
        stats: if given, receives this call's counts as well as `self.stats` (which is per process), and
          its `on_rows`, if set, each batch's rows as the batch completes.  For inputs without a
          variable axis, real and padded "tokens" count rows.

        Raises ValueError naming the input and row for a missing input, a wrong shape or dtype, an
        empty variable axis, or a row longer than the last bucket.  Out-of-memory failures back off
        (see the module docstring); other device errors are raised.
        """
        arrays, lengths = _inputs.check(self._inputs, inputs, self.bucketing.lengths[-1])
        call = EngineStats()
        with self._lock:
            t0 = time.perf_counter()
            compiles, loads, compile_s = self.stats.compiles, self.stats.cache_loads, self.stats.compile_s
            out = _Call(self, arrays, lengths, call, stats.on_rows if stats is not None else None).run()
            call.rows = len(lengths)
            call.real_tokens = int(lengths.sum())
            call.compiles = self.stats.compiles - compiles
            call.cache_loads = self.stats.cache_loads - loads
            call.compile_s = self.stats.compile_s - compile_s
            call.run_s = time.perf_counter() - t0
            self.stats.add(call, compiles=False)
        if stats is not None:
            stats.add(call)
        return out

    def _dispatcher(self) -> ThreadPoolExecutor:
        """The dispatch thread of the next batch: `max_in_flight + 1` one-thread executors (made on first
        use), taken in turn.  The batches in flight are the last `max_in_flight + 1` submitted, so each
        has a thread of its own (a shared pool would hand a batch to any idle thread, and a dispatch
        call returns at once, leaving the thread of a running batch idle)."""
        if not self._dispatchers:
            self._dispatchers = [ThreadPoolExecutor(1, thread_name_prefix=f"bulkinfer-dispatch-{k}")
                                 for k in range(self._max_in_flight + 1)]
        executor = self._dispatchers[self._submitted % len(self._dispatchers)]
        self._submitted += 1
        return executor

    def _dispatch(self, exe: Callable, arrays, rows: np.ndarray, lengths: np.ndarray, shape: tuple):
        """On a dispatch thread: pads (or packs) one batch, calls its executable, starts the copy of its
        outputs to the host and hands them to the clock.  Returns the clock's busy.Ticket.

        XLA:CPU runs the batches one thread dispatches one after another, even though each call returns
        at once; batches dispatched from different threads run at the same time (RUNTIME.md section 2)."""
        if self.packed:
            batch_in = _inputs.pack(self._inputs, arrays, rows, lengths, *shape)
        else:
            batch_in = _inputs.pad(self._inputs, arrays, rows, lengths, *shape)
        output = exe(self._params, batch_in)  # returns before the batch is computed
        if not isinstance(output, dict):
            output = {self._output_name: output}
        for value in output.values():
            value.copy_to_host_async()
        return self._clock.track(output)

    def _back_off(self, budget: int, shape: tuple, error: BaseException, call: EngineStats) -> None:
        """After an out-of-memory failure of a batch planned with `budget`: halve the budget (once per budget).
        shape: (batch, length), or (batch, length, tokens) when packed."""
        call.oom_backoffs += 1
        what = f"{shape[0]} x {shape[1]} batch" + (f" ({shape[2]} tokens)" if len(shape) > 2 else "")
        if budget != self.bucketing.token_budget:  # an earlier failure already lowered it
            log.warning("out of device memory on a %s; rerunning its rows at token_budget %d",
                        what, self.bucketing.token_budget)
            return
        half = self.bucketing.halved()
        if half is None:
            if self._variable:
                fix = (f"the smallest that fits the longest bucket ({self.bucketing.lengths[-1]}); use a shorter "
                       f"max_length, more devices with model_parallel, or a device with more memory")
            else:
                fix = "a single row does not fit; use more devices with model_parallel, or a device with more memory"
            raise RuntimeError(f"out of device memory on a {what} even at token_budget {budget}, {fix}") from error
        log.warning("out of device memory on a %s (token_budget %d); halving the token budget "
                    "to %d for the rest of the run and rerunning its rows: %s",
                    what, budget, half.token_budget, str(error).splitlines()[0][:200])
        self.bucketing = half


class _Call:
    """One `Engine.run` call: plans its rows into batches (again, with the halved budget, after an
    out-of-memory back-off), keeps up to `max_in_flight + 1` of them dispatched, and gathers their outputs
    into [N, ...] arrays in the caller's row order."""

    def __init__(self, engine: Engine, arrays, lengths: np.ndarray, stats: EngineStats,
                 on_rows: Callable[[int], None] | None):
        self.engine, self.arrays, self.lengths = engine, arrays, lengths
        self.stats, self.on_rows = stats, on_rows
        self.out: dict[str, np.ndarray] = {}
        self.todo = collections.deque([np.arange(len(lengths))])  # groups of rows still to plan and run
        self.pending: collections.deque[_InFlight] = collections.deque()

    def run(self) -> dict[str, np.ndarray]:
        try:
            while self.todo or self.pending:
                if self.todo:
                    self._dispatch_group(self.todo.popleft())
                else:
                    self._drain_one()
        except BaseException:
            _abandon(self.pending)
            raise
        return self.out

    def _dispatch_group(self, group: np.ndarray) -> None:
        """Plans `group` (row indices) and dispatches its batches, draining the oldest past max_in_flight.
        After a back-off the rest of the plan, cut for the old budget, goes back to `todo` to be replanned."""
        engine, lengths = self.engine, self.lengths
        bucketing = engine.bucketing
        plan = (bucketing.pack(lengths[group]) if engine.packed else
                [(batch, length, None, idx) for batch, length, idx in bucketing.plan(lengths[group])])
        for k, (batch, length, tokens, idx) in enumerate(plan):
            rows = group[idx]
            shape = (batch, length, tokens) if engine.packed else (batch, length)
            try:
                exe = engine._executable(batch, length, tokens)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                engine._back_off(bucketing.token_budget, shape, e, self.stats)
                self.todo.append(np.concatenate([rows] + [group[rest] for *_, rest in plan[k + 1:]]))
                return
            future = engine._dispatcher().submit(engine._dispatch, exe, self.arrays, rows, lengths[rows], shape)
            self.pending.append(_InFlight(rows, shape, bucketing.token_budget, future))
            if len(self.pending) > engine._max_in_flight:
                self._drain_one()
                if engine.bucketing is not bucketing and k + 1 < len(plan):
                    # A batch failed while running and the budget was halved: replan the rest of this plan
                    # instead of running into the same failure.
                    self.todo.append(np.concatenate([group[rest] for *_, rest in plan[k + 1:]]))
                    return

    def _drain_one(self) -> None:
        """Waits for the oldest batch in flight; keeps its outputs, or backs off and requeues its rows on
        out-of-memory; raises any other error."""
        job = self.pending[0]  # still pending while waited for: an interrupted wait leaves it to `_abandon`
        try:
            ticket = job.future.result()  # raises what padding or the call raised
            ticket.wait()
            error = ticket.error
        except Exception as e:
            error = e
        self.pending.popleft()
        if error is not None:
            if not is_out_of_memory(error):
                raise error
            self.engine._back_off(job.budget, job.shape, error, self.stats)
            self.todo.append(job.rows)
            return
        self._keep(job, ticket)

    def _keep(self, job: _InFlight, ticket) -> None:
        """A completed batch's outputs into their rows of `out`, its counts into the call's stats."""
        n = len(self.lengths)
        for name, value in ticket.output.items():
            host = np.asarray(value)  # [B, ...]; already copied, does not block
            if name not in self.out:
                self.out[name] = np.empty((n,) + host.shape[1:], host.dtype)
            self.out[name][job.rows] = host[: len(job.rows)]
        self.stats.batches += 1
        self.stats.padded_tokens += job.shape[2] if self.engine.packed else job.shape[0] * job.shape[1]
        self.stats.busy_s += ticket.busy_s
        if self.on_rows is not None:
            try:
                self.on_rows(len(job.rows))
            except Exception:  # noqa: BLE001 -- a progress hook must not fail the rows
                log.exception("stats.on_rows raised; the batch's rows are kept")
