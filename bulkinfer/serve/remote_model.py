"""`RemoteModel`: a model that lives on an Open Inference Protocol (v2 REST) server.

    model = RemoteModel(url="http://127.0.0.1:8000", name="digits")
    loaded = model.load()                             # reads the model's metadata from the server
    [(s.name, s.dtype, s.shape) for s in loaded.outputs]     # [("label", "int32", ()), ("probs", "float32", (10,))]
    loaded.predict({"pixels": np.zeros((2, 8, 8), np.float32)})["probs"].shape      # (2, 10)

    p | bulkinfer.BulkInference(model)                # or BulkInference("digits", server=URL)

`RemoteModel` follows the model contract (`bulkinfer.models.signature`) for any signature: the loaded
model's `inputs` and `outputs` are built from the server's metadata (v2 datatype -> dtype, BYTES ->
text; -1 after the batch axis -> a variable axis), so `BulkInference` checks rows and writes every output
as it does for a local model.  `predict` sends every input as binary data and reads every output (or
those named in `output_names`).  It cuts its rows into chunks of `chunk_rows` (rows whose variable axes have
different lengths go in different requests, since a v2 tensor is rectangular) and keeps up to
`max_in_flight` requests in flight per process.
Each request is retried with jittered exponential backoff on connection errors, timeouts, 429 and
5xx, within a retry budget of `retry.budget_s` seconds; past the budget `predict` raises
`ModelUnavailable`, which fails BulkInference's bundle (an outage is not the rows' fault; the runner
retries the bundle, and a job exits non-zero without committing those rows).
A request the server rejects as malformed (400, 413) raises `RemoteError`, which BulkInference
bisects to isolate the rows at fault.  Works with any v2 server whose model metadata gives its batch
axis as a leading -1.  Tensors travel as binary data both ways when the server's metadata (`GET /v2`)
lists the `binary_tensor_data` extension (`bulkinfer serve`, Triton), else as JSON `data` (MLServer,
which answers binary requests with 422).  An output that comes back with extra unit axes ([N, 1] for a
declared [-1], as MLServer's NumpyCodec answers) is reshaped to the declared per-row shape.  Tested
against `bulkinfer serve` and MLServer 1.7.1 (tests/serve/test_serve_third_party.py).
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bulkinfer.errors import ModelUnavailable
from bulkinfer.models.signature import TEXT, TensorSpec
from bulkinfer.serve import protocol
from bulkinfer.serve.v2_client import RemoteError, V2Client

log = logging.getLogger(__name__)

# Statuses worth retrying: the server is overloaded, restarting or behind a proxy that lost it.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Statuses that no retry or bisection can fix: the whole call fails at once.
FATAL_STATUSES = frozenset({401, 403, 404, 405})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long and how often to retry one request.

    budget_s: total seconds one request may spend retrying before its rows are given up.
    base_s, max_backoff_s: the backoff before retry k is about base_s * 2**k, capped at max_backoff_s,
      with the lower half jittered so that many clients do not retry in lockstep.
    attempts_on_500: tries on HTTP 500, which usually means the rows broke the model (not retried long).
    """

    budget_s: float = 120.0
    base_s: float = 0.1
    max_backoff_s: float = 5.0
    attempts_on_500: int = 2

    def __post_init__(self):
        if self.budget_s < 0 or self.base_s <= 0 or self.max_backoff_s < self.base_s or self.attempts_on_500 < 1:
            raise ValueError("need budget_s >= 0, 0 < base_s <= max_backoff_s and attempts_on_500 >= 1")

    def backoff(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """Seconds before retry `attempt`: jittered exponential, but never sooner than the server asked."""
        cap = min(self.max_backoff_s, self.base_s * 2 ** min(attempt, 30))
        return max(cap / 2 + rng.uniform(0, cap / 2), retry_after_s or 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RemoteModel:
    """What to call: a model on a v2 server.  Picklable; `load()` connects and reads the model's signature.

    url: the server, e.g. http://127.0.0.1:8000.   name: the model's name on the server.
    token: a bearer token, if the server needs one (kept out of repr).
    output_names: the outputs to ask for and write, e.g. ("label",) (default: every output in the metadata).
    chunk_rows: rows per request, at most.   max_in_flight: concurrent requests per process.
    timeout_s: socket timeout per request.   retry: see `RetryPolicy`.
    """

    url: str
    name: str
    token: str | None = dataclasses.field(default=None, repr=False)
    output_names: tuple[str, ...] | None = None
    chunk_rows: int = 256
    max_in_flight: int = 4
    timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self):
        V2Client(self.url)  # checks the URL's form now, not on a worker
        if self.chunk_rows < 1 or self.max_in_flight < 1 or self.timeout_s <= 0:
            raise ValueError("chunk_rows and max_in_flight must be >= 1 and timeout_s > 0")
        if self.output_names is not None:
            if isinstance(self.output_names, str) or not self.output_names:
                raise ValueError(f"output_names must be a non-empty tuple of output names, e.g. ('label',), got "
                                 f"{self.output_names!r}")
            object.__setattr__(self, "output_names", tuple(self.output_names))

    @classmethod
    def for_model(cls, url: str, model, **settings) -> RemoteModel:
        """The remote twin of a local model spec (or of a `--model` value: a built-in name or a directory)."""
        if not isinstance(model, str):
            return cls(url=url, name=model.name, **settings)
        return cls(url=url, name=model_name(model), **settings)

    def load(self) -> LoadedRemoteModel:
        return LoadedRemoteModel(self)


def model_name(name_or_path: str) -> str:
    """The name a server gives the model of a `--model` value: the built-in name, the directory's name, or
    a GGUF file's name without ".gguf" (as `registry.resolve_language_model` names it)."""
    from pathlib import Path

    from bulkinfer.models.resolve import builtin_names

    if name_or_path in builtin_names():
        return name_or_path
    return Path(name_or_path).expanduser().resolve().name.removesuffix(".gguf")


class LoadedRemoteModel:
    """A connected `RemoteModel`, following the model contract (`bulkinfer.models.signature`) with the
    server's signature: `predict({input: N values}) -> {output: [N, ...]}`.  Thread-safe; shared by a
    process's DoFn threads."""

    def __init__(self, spec: RemoteModel, *, sleep=time.sleep, clock=time.monotonic):
        t0 = time.perf_counter()
        self.spec = spec
        self.name = spec.name
        self.client = V2Client(spec.url, token=spec.token, timeout_s=spec.timeout_s)
        self._sleep, self._clock = sleep, clock
        self._rng = random.Random()
        meta = self._with_retries(lambda: self.client.model_metadata(spec.name), threading.Event(), "metadata")
        server = self._with_retries(self.client.server_metadata, threading.Event(), "server metadata")
        # Binary tensors when the server says it takes them; JSON (every v2 server's form) otherwise.
        self.binary = "binary_tensor_data" in (server.get("extensions") or [])
        where = f"model {spec.name!r} on {spec.url}"
        self.inputs, self._wire = signature_from_metadata(meta, "inputs", where)
        outputs, _ = signature_from_metadata(meta, "outputs", where)
        if spec.output_names is not None:
            by_name = {o.name: o for o in outputs}
            unknown = [o for o in spec.output_names if o not in by_name]
            if unknown:
                raise ValueError(f"{where} has no output {unknown[0]!r}; its outputs are {sorted(by_name)}; "
                                 "fix RemoteModel(output_names=...)")
            outputs = tuple(by_name[o] for o in spec.output_names)
        self.outputs = outputs
        self._pool = ThreadPoolExecutor(spec.max_in_flight, thread_name_prefix="bulkinfer-remote")
        self.load_s = time.perf_counter() - t0

    def predict(self, inputs: Mapping[str, np.ndarray | list], stats=None) -> dict[str, np.ndarray]:
        """The model contract: {input name: N rows' values} -> {output name: [N, ...] array}, in input order.

        inputs: every input of `self.inputs`: an array [N, *shape] (or a list of N rows) for a fixed shape,
          a list of N arrays for a variable axis, a list of N str for text.
        Raises ModelUnavailable past the retry budget (or for an unreadable reply), RemoteError on a 4xx
        (the rows' fault: BulkInference bisects), ValueError for inputs that miss a name or disagree on N.
        """
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise ValueError(f"predict needs every input of model {self.name!r}: {missing} missing from "
                             f"{sorted(inputs)}")
        sizes = {s.name: len(inputs[s.name]) for s in self.inputs}
        n = next(iter(sizes.values()))
        if any(k != n for k in sizes.values()):
            raise ValueError(f"the inputs of one predict call must have the same rows; got {sizes}")
        t0 = time.perf_counter()
        if n == 0:
            return {s.name: s.empty() for s in self.outputs}
        chunks = self._chunks(inputs, n)
        give_up = threading.Event()  # set when one chunk fails: the others stop retrying
        names = [s.name for s in self.outputs]

        def one(rows):
            tensors, tail = self._encode(inputs, rows)
            try:
                return self._with_retries(
                    lambda: self.client.infer_tensors(self.name, tensors, tail, names, binary=self.binary),
                    give_up, "infer")
            except BaseException:
                give_up.set()
                raise

        if len(chunks) == 1:
            parts = [one(chunks[0])]
        else:
            futures = [self._pool.submit(one, c) for c in chunks]
            errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None and not isinstance(e, _GaveUp)), None)
            if first is not None:
                raise first
            parts = [f.result() for f in futures]
        out = _scatter(chunks, [self._declared_shapes(p) for p in parts], names, n)
        if stats is not None:
            stats.rows += n
            stats.batches += len(chunks)
            stats.run_s += time.perf_counter() - t0
        return out

    def embed(self, texts: Sequence[str], stats=None) -> np.ndarray:
        """A text model's one output for `texts`, e.g. [N, dim] float32 embeddings, in input order."""
        if len(self.inputs) != 1 or self.inputs[0].dtype != TEXT or len(self.outputs) != 1:
            raise TypeError(f"embed is for a model with one text input and one output; model {self.name!r} has "
                            f"inputs {[s.name for s in self.inputs]} and outputs {[s.name for s in self.outputs]}; "
                            "use predict")
        return self.predict({self.inputs[0].name: texts}, stats=stats)[self.outputs[0].name]

    def _chunks(self, inputs, n: int) -> list[slice | np.ndarray]:
        """Row selections of at most chunk_rows rows each: slices in order, or, with a variable axis, index
        arrays of rows whose variable axes have the same lengths (one v2 tensor is rectangular)."""
        size = self.spec.chunk_rows
        variable = [s.name for s in self.inputs if s.variable]
        if not variable:
            return [slice(i, min(i + size, n)) for i in range(0, n, size)]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(np.shape(inputs[name][i]) for name in variable), []).append(i)
        return [np.asarray(rows[i : i + size], np.int64) for rows in groups.values() for i in range(0, len(rows), size)]

    def _declared_shapes(self, part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One reply's outputs with the per-row shapes of the metadata: an output whose rows differ from
        the declared fixed shape only by unit axes ([N, 1] for a declared [-1]) is reshaped; any other
        mismatch is left for `_scatter` and the writer to report."""
        out = dict(part)
        for spec in self.outputs:
            array = part.get(spec.name)
            if array is None or array.ndim < 1 or spec.variable or array.shape[1:] == spec.shape:
                continue
            if [d for d in array.shape[1:] if d != 1] == [d for d in spec.shape if d != 1]:
                out[spec.name] = array.reshape((array.shape[0], *spec.shape))  # [N, *declared]
        return out

    def _encode(self, inputs, rows: slice | np.ndarray) -> tuple[list[dict], bytes]:
        """The request's input tensors (binary, or JSON when the server takes no binary) for the selected
        rows, and their bytes (b"" for JSON)."""
        tensors, tails = [], []
        for s in self.inputs:
            values = inputs[s.name]
            if s.dtype == TEXT:
                chosen = values[rows] if isinstance(rows, slice) else [values[i] for i in rows]
                tensor, raw = protocol.encode_tensor(s.name, "BYTES", chosen, binary=self.binary,
                                                     shape=[len(chosen), *self._wire[s.name]])
            else:
                if isinstance(values, np.ndarray):
                    chosen = values[rows]
                else:
                    chosen = np.stack([np.asarray(values[i]) for i in range(len(values))[rows]]
                                      if isinstance(rows, slice) else [np.asarray(values[i]) for i in rows])
                tensor, raw = protocol.encode_tensor(s.name, s.v2_datatype, chosen, binary=self.binary)
            tensors.append(tensor)
            tails.append(raw)
        return tensors, b"".join(tails)

    def _with_retries(self, call, give_up: threading.Event, what: str):
        policy, start, attempt, failures_500 = self.spec.retry, self._clock(), 0, 0
        while True:
            if give_up.is_set():
                raise _GaveUp("another request of the same call gave up")
            try:
                return call()
            except RemoteError as e:
                if e.status in FATAL_STATUSES:
                    raise ModelUnavailable(f"server {self.spec.url}, model {self.name!r}: {e}") from None
                if e.status == 500:
                    failures_500 += 1
                    if failures_500 >= policy.attempts_on_500:
                        raise
                elif e.status not in RETRY_STATUSES and e.status < 500:
                    raise  # 400, 413, ...: the rows or their size; bisection can isolate them
                reason, retry_after = str(e), e.retry_after_s
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut off
                reason, retry_after = f"{type(e).__name__}: {e}", None
            attempt += 1
            delay = policy.backoff(attempt, self._rng, retry_after)
            elapsed = self._clock() - start
            if elapsed + delay > policy.budget_s:
                raise ModelUnavailable(
                    f"server {self.spec.url}, model {self.name!r}: {what} failed {attempt} times in {elapsed:.1f} s "
                    f"(retry budget {policy.budget_s:g} s); last error: {reason}") from None
            log.warning("server %s: %s failed (%s); retry %d in %.2f s", self.spec.url, what, reason, attempt, delay)
            self._sleep(delay)


class _GaveUp(ModelUnavailable):
    """A chunk abandoned because another chunk of the same call already failed."""


def signature_from_metadata(meta: dict, key: str, where: str) -> tuple[tuple[TensorSpec, ...], dict[str, list[int]]]:
    """TensorSpecs of the metadata's "inputs" or "outputs", and each BYTES tensor's axes after the batch
    axis ([] or [1]: text is one string per row either way).

    The first axis must be the batch axis (-1); a later -1 is a variable axis (None).  Raises ValueError
    naming the tensor for a datatype or shape that a bulkinfer model cannot have.
    """
    tensors = meta.get(key)
    if not isinstance(tensors, list) or (key == "inputs" and not tensors):
        raise ValueError(f"{where}: its metadata has no {key!r} list: {str(meta)[:200]}")
    specs, wire = [], {}
    for t in tensors:
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        kind = key[:-1]
        if datatype not in protocol.SPEC_DTYPES:
            raise ValueError(f"{where}: {kind} {name!r} has datatype {datatype!r}; RemoteModel takes "
                             f"{sorted(protocol.SPEC_DTYPES)}")
        if not isinstance(shape, list) or not shape or shape[0] != -1:
            raise ValueError(f"{where}: {kind} {name!r} has shape {shape!r}; RemoteModel needs a batch axis "
                             "first, -1 (a Triton model with max_batch_size > 0)")
        dims = shape[1:]
        if datatype == "BYTES":
            if dims not in ([], [1]):
                raise ValueError(f"{where}: {kind} {name!r} has shape {shape!r}; a BYTES tensor must hold one "
                                 "string per row ([-1] or [-1, 1])")
            wire[name], dims = dims, []
        try:
            specs.append(TensorSpec(name, tuple(None if d == -1 else d for d in dims), protocol.SPEC_DTYPES[datatype]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return tuple(specs), wire


def _scatter(chunks: list, parts: list[dict], names: list[str], n: int) -> dict[str, np.ndarray]:
    """Each output's [n, ...] array from the chunks' replies, rows back in input order."""
    sizes = [len(range(n)[rows]) if isinstance(rows, slice) else len(rows) for rows in chunks]
    out = {}
    for name in names:
        for size, part in zip(sizes, parts):
            got = part[name].shape[0] if part[name].ndim else 0
            if got != size:
                raise RemoteError(200, f"the server returned {got} rows of {name!r} for {size} inputs")
        first = parts[0][name]
        if len(parts) == 1 and isinstance(chunks[0], slice):
            out[name] = first
            continue
        shapes = {p[name].shape[1:] for p in parts}
        if len(shapes) > 1:
            raise RemoteError(200, f"output {name!r} came back with per-row shapes {sorted(shapes)} from "
                              "different requests; one predict call needs one shape")
        array = np.empty((n, *first.shape[1:]), first.dtype)  # [n, ...]
        for rows, part in zip(chunks, parts):
            array[rows] = part[name]
        out[name] = array
    return out
