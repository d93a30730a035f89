"""Text embeddings: a sentence-transformers / HF directory, tokenized in batches, run by the engine.

Families (config.json model_type): bert, roberta, xlm-roberta, distilbert; others are refused.

    >>> model = TextEmbedder.from_name("minilm")
    >>> loaded = model.load()                      # once per process; BulkInference does this in setup
    >>> loaded.embed(["a sentence", "another"]).shape
    (2, 384)
    >>> loaded.predict({"text": ["a sentence"]})["embedding"].shape     # the model contract
    (1, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bulkinfer.models import bert, checkpoint, weights
from bulkinfer.models.registry import BUILTIN_MODELS, model_dir_here, resolve_model_dir
from bulkinfer.models.signature import TEXT, TensorSpec
from bulkinfer.runtime import Bucketing, Engine
from bulkinfer.runtime.executables import ExecutableCache, source_digest
from bulkinfer.runtime.process import compilation_cache_dir, use_compilation_cache

log = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16")
INPUT, OUTPUT = "text", "embedding"  # the text family's tensor names (row fields by default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEmbedder:
    """What to load: a picklable description, cheap to send to workers.  `load()` does the work.

    path: model directory (config.json, *.safetensors, tokenizer.json, sentence-transformers files) on the
      machine that made the spec.  `path` and `source` are not part of the spec's identity (compare=False;
      `digest` is): two copies of one model are the same spec, and a job resumes after the directory moves.
    name: the model's name in reports and on the server.
    source: what the user gave (a built-in name, a path, a URL such as gs://bucket/model-dir); a worker
      where `path` does not exist re-resolves the model from it.  Default: `path`.
    digest: the model's identity, `weights.fingerprint` of the directory's files.  Default: computed from
      `path`; `load()` refuses a directory whose content has another digest.
    max_length: truncation length in tokens; default: the directory's max_seq_length.
    dtype: compute dtype of the encoder ("float32" or "bfloat16"); pooling is always float32.
    bucketing: the static shapes the engine may run; None: `Bucketing.for_platform` of the platform the
      model loads on (a smaller token budget on the CPU than on an accelerator).
    max_in_flight: batches dispatched ahead of the one the host waits for (pipelined dispatch), each by a
      thread of its own: on the CPU they compute at once (`Engine`); 0 runs one batch at a time.
    warmup: compile every shape at load time instead of on first use.
    compilation_cache_dir: a persistent XLA compilation cache shared across processes and runs: a path
      every worker can use (local, gs://...), or `bulkinfer.runtime.process.WORKER_LOCAL` for each worker's
      own default (~/.cache/bulkinfer/xla there, resolved on the worker); None: no cache.  In a local
      directory the engine keeps its serialized executables (`runtime.executables`), which a warm process
      loads without tracing or lowering; a URL holds JAX's own cache, consulted after both.
    model_parallel: split the encoder's big matrices over this many devices (a "model" mesh axis),
      for a model larger than one device; the remaining factor of the devices splits the batch.
    packed: run padding-free batches (`Engine(packed=True)`, `bert.encode_packed`): the token-wise layers
      compute real tokens only.  None: on where the engine splits no batch over devices and runs on the
      CPU, whose throughput follows the tokens computed (RUNTIME.md section 9); off on accelerators,
      where it is not measured yet.
    """

    path: str = dataclasses.field(compare=False)
    name: str
    source: str = dataclasses.field(default="", compare=False)
    digest: str = ""
    max_length: int | None = None
    dtype: str = "float32"
    bucketing: Bucketing | None = None
    max_in_flight: int = 2
    warmup: bool = False
    compilation_cache_dir: str | None = None
    model_parallel: int = 1
    packed: bool | None = None

    output_name = OUTPUT  # the row field its predictions go to (the loaded model says the same)
    input_signature = (TensorSpec(INPUT, (), TEXT),)  # known before loading: JaxModelHandler checks elements with it

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.path)
        if not self.digest:
            object.__setattr__(self, "digest", weights.fingerprint(self.path))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; expected one of {_DTYPES}")
        if self.max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {self.max_in_flight}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {self.max_length}")

    @classmethod
    def from_name(cls, name_or_path: str, **settings) -> TextEmbedder:
        """A built-in model name (`minilm`), a path to a model directory, or a URL of one on any Beam
        filesystem (`gs://bucket/model-dir`).  Raises CheckpointError naming the value otherwise."""
        name, path = resolve_model_dir(name_or_path)
        source = name_or_path if name_or_path in BUILTIN_MODELS or "://" in name_or_path else str(path)
        spec = cls(path=str(path), name=name, source=source, digest=weights.fingerprint(path), **settings)
        spec.check()
        return spec

    def check(self) -> None:
        """Validates the directory without loading weights (config, tokenizer, every tensor's name and
        shape, a complete weights file), so a bad checkpoint fails before a pipeline starts."""
        directory = Path(self.path)
        config = checkpoint.read_config(directory)  # refuses an unsupported model_type
        settings = checkpoint.sentence_settings(directory, config)  # checks Dense modules too
        checkpoint.load_tokenizer(directory, settings.max_length)
        checkpoint.check_bert_shapes(checkpoint.safetensors_shapes(directory), config)
        if self.max_length is not None and self.max_length > config.max_tokens:
            log.warning("max_length %d is more than the %d positions of %s's position table; texts are truncated "
                        "at %d tokens", self.max_length, config.max_tokens, self.name, config.max_tokens)

    def load(self) -> LoadedTextEmbedder:
        # The launcher's path may not exist here (a remote worker, a moved venv): find the model by content.
        local = model_dir_here(path=self.path, source=self.source, digest=self.digest)
        return LoadedTextEmbedder(dataclasses.replace(self, path=str(local)))


def bucketing_for(spec: TextEmbedder) -> Bucketing:
    """spec.bucketing, or when it is None the default for the platform JAX runs on in this process."""
    import jax

    return spec.bucketing if spec.bucketing is not None else Bucketing.for_platform(jax.default_backend())


def packed_for(spec: TextEmbedder) -> bool:
    """spec.packed, or when it is None: True on the CPU when the mesh's data axis is one device."""
    import jax

    if spec.packed is not None:
        return spec.packed
    return jax.default_backend() == "cpu" and len(jax.local_devices()) // spec.model_parallel == 1


def embed_batch(params, batch, **settings):
    """The engine's function for text: `bert.embed` over batch["input_ids"] [B, L] int32 and
    batch["mask"] [B, L] int32, giving [B, D] float32; settings (config, pooling, normalize) are bound
    with functools.partial.  A packed batch (`Engine(packed=True)`) has input_ids [T] and the packed keys."""
    packed = (batch["positions"], batch["row_ids"], batch["token_index"]) if "token_index" in batch else None
    return bert.embed(params, batch["input_ids"], batch["mask"], packed=packed, **settings)


def _code_key(config: bert.BertConfig, settings: checkpoint.SentenceSettings) -> str:
    """What `embed_batch` with these settings computes: its modules' source and the bound settings."""
    return (f"{source_digest(__name__, bert.__name__)} {config!r} pooling={settings.pooling} "
            f"normalize={settings.normalize} dense={settings.activations}")


class LoadedTextEmbedder:
    """A loaded model: parameters on the devices, a tokenizer and an engine.  Thread-safe."""

    def __init__(self, spec: TextEmbedder):
        import jax

        t0 = time.perf_counter()
        directory = Path(spec.path)
        config = checkpoint.read_config(directory)
        settings = checkpoint.sentence_settings(directory, config)
        # Resolved here, on the worker.  A local directory holds this engine's serialized executables, found
        # without tracing or lowering (runtime.executables); a URL is JAX's own cache, consulted after both.
        cache_dir = compilation_cache_dir(spec.compilation_cache_dir, os.environ)
        executable_cache = ExecutableCache.beside(cache_dir, _code_key(config, settings))
        if executable_cache is None:
            use_compilation_cache(spec.compilation_cache_dir)
        max_len = min(spec.max_length or settings.max_length, config.max_tokens)
        self.tokenizer = checkpoint.load_tokenizer(directory, max_len)
        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[spec.dtype]
        params = checkpoint.bert_params(checkpoint.read_safetensors(directory), config, dtype=dtype)
        if settings.dense:
            params["dense"] = checkpoint.dense_params(settings)  # float32, after pooling
        fn = functools.partial(embed_batch, config=config, pooling=settings.pooling, normalize=settings.normalize,
                               dense=settings.activations)
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.engine = Engine(
            fn, params, inputs={"input_ids": ((None,), "int32")}, pad_values={"input_ids": pad_id},
            bucketing=bucketing_for(spec).for_max_length(max_len), max_in_flight=spec.max_in_flight,
            model_parallel=spec.model_parallel, param_spec=bert.param_spec,
            executable_cache=executable_cache, packed=packed_for(spec),
        )
        if spec.warmup:
            self.engine.warmup()
        self.name = spec.name
        self.dim = settings.dim(config)
        self.max_length = max_len
        self.load_s = time.perf_counter() - t0

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(list(texts))
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(INPUT, (), TEXT),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(OUTPUT, (self.dim,), "float32"),)

    def predict(self, inputs: Mapping[str, Sequence[str]], stats=None) -> dict[str, np.ndarray]:
        """The model contract (`bulkinfer.models.signature`): {"text": N strings} -> {"embedding": [N, dim] float32}."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"predict takes {{{INPUT!r}: texts}}; for a plain list of texts use embed(texts)")
        return {OUTPUT: self.embed(inputs[INPUT], stats=stats)}

    def embed(self, texts: Sequence[str], stats=None) -> np.ndarray:
        """[N, dim] float32 embeddings, in input order.  `stats`: an EngineStats to add this call's counts to."""
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return self.engine.run({"input_ids": self.tokenize(texts)}, stats=stats)["output"]
