"""Text embeddings: a sentence-transformers / HF BERT directory, tokenized in batches, run by the engine.

    >>> model = TextEmbedder.from_name("minilm")
    >>> loaded = model.load()                      # once per process; BulkInference does this in setup
    >>> loaded.predict(["a sentence", "another"]).shape
    (2, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bulkinfer.models import bert, checkpoint
from bulkinfer.models.registry import resolve_model_dir
from bulkinfer.runtime import Bucketing, Engine

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEmbedder:
    """What to load: a picklable description, cheap to send to workers.  `load()` does the work.

    path: model directory (config.json, *.safetensors, tokenizer.json, sentence-transformers files).
    name: the model's name in reports and on the server.
    max_length: truncation length in tokens; default: the directory's max_seq_length.
    dtype: compute dtype of the encoder ("float32" or "bfloat16"); pooling is always float32.
    bucketing: the static shapes the engine may run.
    max_in_flight: batches dispatched ahead of the one the host waits for (pipelined dispatch).
    warmup: compile every shape at load time instead of on first use.
    compilation_cache_dir: a persistent XLA compilation cache shared across processes and runs.
    model_parallel: split the encoder's big matrices over this many devices (a "model" mesh axis),
      for a model larger than one device; the remaining factor of the devices splits the batch.
    """

    path: str
    name: str
    max_length: int | None = None
    dtype: str = "float32"
    bucketing: Bucketing = Bucketing()
    max_in_flight: int = 2
    warmup: bool = False
    compilation_cache_dir: str | None = None
    model_parallel: int = 1

    output_name = "embedding"  # the row field its predictions go to (the loaded model says the same)

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; expected one of {_DTYPES}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {self.max_length}")

    @classmethod
    def from_name(cls, name_or_path: str, **settings) -> TextEmbedder:
        """A built-in model name (`minilm`) or a path to a model directory."""
        name, path = resolve_model_dir(name_or_path)
        spec = cls(path=str(path), name=name, **settings)
        spec.check()
        return spec

    def check(self) -> None:
        """Validates the directory without loading weights (config, tokenizer, every tensor's name and
        shape, a complete weights file), so a bad checkpoint fails before a pipeline starts."""
        directory = Path(self.path)
        config = bert.BertConfig.from_hf(checkpoint.read_json(directory / "config.json"))
        _, _, max_len = checkpoint.sentence_settings(directory, config)
        checkpoint.load_tokenizer(directory, max_len)
        checkpoint.check_bert_shapes(checkpoint.safetensors_shapes(directory), config)

    def load(self) -> LoadedTextEmbedder:
        return LoadedTextEmbedder(self)


def embed_batch(params, batch, **settings):
    """The engine's function for text: `bert.embed` over batch["input_ids"] [B, L] int32 and
    batch["mask"] [B, L] int32, giving [B, D] float32; settings (config, pooling, normalize) are bound
    with functools.partial."""
    return bert.embed(params, batch["input_ids"], batch["mask"], **settings)


class LoadedTextEmbedder:
    """A loaded model: parameters on the devices, a tokenizer and an engine.  Thread-safe."""

    def __init__(self, spec: TextEmbedder):
        import jax

        t0 = time.perf_counter()
        if spec.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", spec.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        directory = Path(spec.path)
        config = bert.BertConfig.from_hf(checkpoint.read_json(directory / "config.json"))
        pooling, normalize, max_len = checkpoint.sentence_settings(directory, config)
        max_len = min(spec.max_length or max_len, config.max_position)
        self.tokenizer = checkpoint.load_tokenizer(directory, max_len)
        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[spec.dtype]
        params = checkpoint.bert_params(checkpoint.read_safetensors(directory), config, dtype=dtype)
        fn = functools.partial(embed_batch, config=config, pooling=pooling, normalize=normalize)
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.engine = Engine(
            fn, params, inputs={"input_ids": ((None,), "int32")}, pad_values={"input_ids": pad_id},
            bucketing=spec.bucketing.for_max_length(max_len), max_in_flight=spec.max_in_flight,
            model_parallel=spec.model_parallel, param_spec=bert.param_spec,
        )
        if spec.warmup:
            self.engine.warmup()
        self.name = spec.name
        self.dim = config.hidden_size
        self.max_length = max_len
        self.load_s = time.perf_counter() - t0

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(list(texts))
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    output_name = "embedding"
    input_type = str

    def predict(self, texts: Sequence[str], stats=None) -> np.ndarray:
        """[N, dim] float32 embeddings, in input order.  `stats`: an EngineStats to add this call's counts to."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.engine.run({"input_ids": self.tokenize(texts)}, stats=stats)["output"]
