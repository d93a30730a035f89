"""`JaxModel`: your own pure JAX function as a bulkinfer model, with static shapes, pipelined dispatch,
devices, dead letters and metrics written once for every model.

    def classify(params, batch):            # batch: {"pixels": float32 [B, 8, 8]}
        logits = ...                        # [B, 10]
        return {"label": jnp.argmax(logits, -1), "probs": jax.nn.softmax(logits)}

    model = bulkinfer.JaxModel(classify, params="gs://bucket/cnn.safetensors",
                               inputs={"pixels": ((8, 8), "float32")}, name="my-cnn")
    rows | bulkinfer.BulkInference(model)   # each row: {"id": ..., "pixels": nested list, numpy array or Arrow list}

The loaded model follows the contract in `bulkinfer.models.signature`.  Rows are stacked into a small
ladder of batch sizes (`batch_size` and its halvings); the last batch is padded with filler rows whose
outputs are dropped, never run at a new shape.  An input may declare one variable axis (`None` in its
shape): rows are then bucketed by that length as token sequences are, and `batch["mask"]` [B, L] int32
marks the real positions.  `fn` must treat rows independently (no batch statistics), because filler rows
share its batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import marshal
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bulkinfer.models.signature import TEXT, TensorSpec, signature
from bulkinfer.runtime import DEFAULT_LENGTHS, Bucketing
from bulkinfer.runtime.process import use_compilation_cache


@dataclasses.dataclass(frozen=True, eq=False)
class JaxModel:
    """What to run: a pure function, its parameters and its input signature.  Picklable; `load()` does the work.

    fn: `fn(params, batch) -> array [B, ...] or dict of arrays [B, ...]`, pure; parameters are passed in,
      never captured.  `batch` holds each input as [B, *shape] (plus "mask" [B, L] int32 when an input has
      a variable axis).  Define it at module level so that workers can unpickle it.
    params: a pytree of arrays, or a path on any Beam filesystem to a `.safetensors` file (flat names;
      `a.b` nests) or an Orbax checkpoint directory.  Workers fetch paths into a local cache.
    inputs: {name: (per-row shape, dtype)}, e.g. {"pixels": ((8, 8), "float32")}; the row field is the name.
    name: in reports and on the server (default: fn's name).
    output_field: the output name of a single-array result (a dict result keeps its keys).
    batch_size: the largest batch (rows); smaller batches halve it `ladder` times (default 256 -> 32).
    max_length, token_budget: for a variable axis, the last bucket and rows x length per batch.
    max_in_flight, warmup, compilation_cache_dir: as for `TextEmbedder`.

    The model is identified by its content: equal specs have the same function (its pickled form and
    compiled code, so two lambdas or two closures over different values differ, and an edited function
    body too), the same parameter digest (sha256 of the arrays or of the checkpoint's bytes, not its
    path) and the same settings.
    Raises ValueError for a malformed signature or setting, CheckpointError for unreadable parameters.
    """

    fn: Callable
    _: dataclasses.KW_ONLY
    params: Any
    inputs: Mapping[str, tuple]
    name: str | None = None
    output_field: str = "output"
    batch_size: int = 256
    ladder: int = 3
    max_length: int = 512
    token_budget: int = 8192
    max_in_flight: int = 2
    warmup: bool = False
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"fn must be a function fn(params, batch), got {self.fn!r}")
        specs = signature(self.inputs)
        if any(s.dtype == TEXT for s in specs):
            raise ValueError("JaxModel inputs are arrays; tokenize text first (or use TextEmbedder)")
        if "mask" in self.inputs:
            raise ValueError("the input name 'mask' is reserved for the variable axis' mask; rename the input")
        if self.batch_size < 1 or self.ladder < 0 or self.max_length < 1 or self.max_in_flight < 0:
            raise ValueError(f"need batch_size >= 1 ({self.batch_size}), ladder >= 0 ({self.ladder}), "
                             f"max_length >= 1 ({self.max_length}) and max_in_flight >= 0 ({self.max_in_flight})")
        object.__setattr__(self, "inputs", {s.name: (s.shape, s.dtype) for s in specs})
        if self.name is None:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "jax-model"))
        object.__setattr__(self, "_signature", specs)
        object.__setattr__(self, "params_digest", _params_digest(self.params))
        object.__setattr__(self, "_fn_digest", _fn_digest(self.fn))
        self.bucketing()  # a setting the engine cannot use fails here, not on a worker

    @property
    def digest(self) -> str:
        """sha256 of what the model computes: the function's code (and captured values), the parameters'
        content and the signature; what resumed jobs compare."""
        parts = (self._fn_digest, self.params_digest, repr(self._signature))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def _key(self) -> tuple:
        settings = tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                         if f.name not in ("fn", "params", "inputs"))
        return (self._fn_digest, self.params_digest, self._signature, settings)

    def __eq__(self, other) -> bool:
        return isinstance(other, JaxModel) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        params = repr(os.fspath(self.params)) if isinstance(self.params, str | os.PathLike) else f"<pytree {self.params_digest[:12]}>"
        return f"JaxModel(name={self.name!r}, inputs={self.inputs}, params={params})"

    @property
    def input_signature(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, known before loading (JaxModelHandler checks elements with them)."""
        return self._signature

    def bucketing(self) -> Bucketing:
        """The shapes the engine may run: rows only, or rows x buckets of the variable axis."""
        if not any(s.variable for s in self._signature):
            return Bucketing.for_rows(batch_size=self.batch_size, ladder=self.ladder)
        lengths = tuple(n for n in DEFAULT_LENGTHS if n < self.max_length) + (self.max_length,)
        return Bucketing(lengths=lengths, token_budget=max(self.token_budget, self.max_length),
                         max_batch=self.batch_size, ladder=self.ladder)

    def load(self) -> LoadedJaxModel:
        return LoadedJaxModel(self)


def _fn_digest(fn) -> str:
    """sha256 of a function: its cloudpickle form (a module-level function by reference, a lambda or
    closure by value, captured values included) and, for plain and partial functions, its code object."""
    import cloudpickle

    h = hashlib.sha256(cloudpickle.dumps(fn))
    code = getattr(getattr(fn, "func", fn), "__code__", None)
    if code is not None:
        h.update(marshal.dumps(code))
    return h.hexdigest()


def _params_digest(params) -> str:
    from bulkinfer.models import weights

    if isinstance(params, str | os.PathLike):
        return weights.fingerprint(params)
    return weights.pytree_fingerprint(params)


class LoadedJaxModel:
    """A loaded `JaxModel`: parameters on the devices and an engine.  Thread-safe.

    predict({input: [N, *shape] array, or N arrays for a variable axis}) -> {output: [N, ...] array}.
    """

    def __init__(self, spec: JaxModel):
        from bulkinfer.models import weights
        from bulkinfer.runtime import Engine

        t0 = time.perf_counter()
        use_compilation_cache(spec.compilation_cache_dir)  # resolved here, on the worker
        source = spec.params
        if isinstance(source, str | os.PathLike):
            source = weights.fetch(source, spec.params_digest)
        params = weights.load_params(source)
        self.name = spec.name
        self.inputs = spec.input_signature
        self.outputs = _outputs(spec, params)
        self.engine = Engine(spec.fn, params, inputs=spec.inputs, bucketing=spec.bucketing(),
                             output_name=spec.output_field, max_in_flight=spec.max_in_flight)
        if spec.warmup:
            self.engine.warmup()
        self.load_s = time.perf_counter() - t0

    def predict(self, inputs: Mapping[str, np.ndarray | list], stats=None) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        if n == 0:
            return {o.name: o.empty() for o in self.outputs}
        out = self.engine.run(inputs, stats=stats)
        # bfloat16 has no numpy or Arrow form that writers take: outputs leave the model as float32.
        return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in out.items()}


def _outputs(spec: JaxModel, params) -> tuple[TensorSpec, ...]:
    """The outputs' per-row shapes and dtypes, traced (jax.eval_shape) without running the model.

    Traced at two batch sizes and, with a variable axis, two lengths: an output whose shape follows the
    variable axis cannot be written as one fixed-shape value per row and is refused.
    """
    import jax

    def traced(rows: int, length: int):
        batch = {s.name: jax.ShapeDtypeStruct((rows, *(length if d is None else d for d in s.shape)),
                                              np.float32 if s.dtype == "bfloat16" else s.dtype)
                 for s in spec.input_signature}
        if any(s.variable for s in spec.input_signature):
            batch["mask"] = jax.ShapeDtypeStruct((rows, length), np.int32)
        try:
            out = jax.eval_shape(spec.fn, params, batch)
        except Exception as e:  # the user's function does not fit its parameters or declared inputs
            names = sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params))
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(
                f"model {spec.name!r}: fn(params, batch) fails on its declared inputs "
                f"{ {k: v.shape for k, v in batch.items()} } with parameters [{shown}]: "
                f"{type(e).__name__}: {e}") from None
        return out if isinstance(out, dict) else {spec.output_field: out}

    a, b = traced(2, 8), traced(3, 16)
    specs = []
    for name, x in a.items():
        y = b.get(name)
        if y is None or x.shape[1:] != y.shape[1:] or x.shape[0] != 2 or y.shape[0] != 3:
            raise ValueError(f"model {spec.name!r}: output {name!r} must be [B, ...] with a per-row shape that does "
                             f"not depend on the batch size or the variable axis (got {x.shape} and "
                             f"{None if y is None else y.shape} for batches of 2x8 and 3x16)")
        dtype = np.dtype(x.dtype).name
        specs.append(TensorSpec(name, tuple(x.shape[1:]), "float32" if dtype == "bfloat16" else dtype))
    return tuple(specs)
