"""Text generation under the model contract: a language model plus sampling settings, so that
`BulkInference`, the run job's machinery (units, commits, resume, dead letters) and `bulkinfer serve` run
a decoder LM unchanged.

    >>> gen = Generator(model=LanguageModel.from_name("smollm2"),
    ...                 sampling=SamplingParams(temperature=0.7, max_new_tokens=64, seed=1), chat=True)
    >>> loaded = gen.load()                        # once per process; BulkInference does this in setup
    >>> loaded.predict({"prompt": ["Name a colour."], "id": ["a"]})["completion"]
    array(['Blue.'], dtype=object)

Inputs per row: `prompt` (text; `prompt_field` renames it) and `id` (a string or an integer; its str()
keys the row's randomness, see `runtime.sampling`; `id_field=None` keys it by the prompt's text instead).
Outputs per row: `completion` (text), `tokens_generated` (int32), `finish_reason` ("stop" or "length"),
and with `sampling.logprobs` `logprobs` (float32 per completion token); with `sampling.n > 1` each is
[n] (one entry per sample).

A prompt that is empty or too long for the context (tokens + 1 > max_len) makes `predict` raise a
`PromptError` naming its length before anything runs; the caller's bisection makes it that row's dead
letter alone.  Prompts are never truncated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bulkinfer.models.signature import KEY, TEXT, TensorSpec
from bulkinfer.runtime.generate import GenerationEngine
from bulkinfer.runtime.sampling import SamplingParams

PROMPT, ID = "prompt", "id"
OUTPUTS = ("completion", "tokens_generated", "finish_reason")
PARAMETERS = "parameters"  # an optional input: per-row {setting: value} overrides (the server's request parameters)
_DEFAULT_SAMPLING = SamplingParams()
# Request parameters a caller may set per row (the rest of SamplingParams is the Generator's).
ROW_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "stop",
                "stop_token_ids", "seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generator:
    """What to generate with: picklable and hashable, loaded on the worker.

    model: a language-model spec (`bulkinfer.models.lm.LanguageModel`, or anything whose `load()` gives
      config, params, eos_token_ids, encode, decode and apply_chat_template).
    sampling: the sampling settings of every row (per-row overrides: the `parameters` input).
    chat: wrap each prompt as a user message in the model's chat template (with a generation prompt).
    system: a system message before it (chat only).
    prompt_field, id_field: the row fields read (the inputs' names).
    slots: sequences decoded together (the KV cache's rows).  A decode step reads every weight once for
      all slots, so more slots give more tokens/s (bench/generate.py) for slots x max_len cache positions
      of memory (SmolLM2-135M, float32: 46 KB per position, 1.5 GB for 32 x 1024).
      max_len: context per slot in tokens (default: the model's max_position_embeddings, at most 1024).
    prefill_lengths: prompt-length buckets (each compiles once).  warmup: compile them all at load.
    dtype: the cache's and parameters' compute dtype ("float32" or "bfloat16").

    Raises ValueError for `system` without `chat`, or bad sizes.
    """

    model: Any
    sampling: SamplingParams = _DEFAULT_SAMPLING
    chat: bool = False
    system: str | None = None
    prompt_field: str = PROMPT
    id_field: str | None = ID
    slots: int = 32
    max_len: int | None = None
    prefill_lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    warmup: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "prefill_lengths", tuple(self.prefill_lengths))
        if self.system is not None and not self.chat:
            raise ValueError("a system message needs chat=True (--chat): it goes into the chat template")
        if self.slots < 1 or (self.max_len is not None and self.max_len < 2):
            raise ValueError(f"slots must be >= 1 and max_len >= 2, got slots={self.slots}, max_len={self.max_len}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} is not supported; expected 'float32' or 'bfloat16'")
        if self.prompt_field == self.id_field:
            raise ValueError(f"prompt_field and id_field are both {self.prompt_field!r}")

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def digest(self) -> str:
        """The model's digest and every setting that changes completions: a job resumes only with the same."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "warmup", "slots")}
        text = json.dumps(settings, sort_keys=True, default=str)
        return f"{getattr(self.model, 'digest', '')}+{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    @property
    def input_signature(self) -> tuple[TensorSpec, ...]:
        specs = [TensorSpec(self.prompt_field, (), TEXT)]
        if self.id_field is not None:
            specs.append(TensorSpec(self.id_field, (), KEY))
        return tuple(specs)

    def output_signature(self) -> tuple[TensorSpec, ...]:
        shape = (self.sampling.n,) if self.sampling.n > 1 else ()
        specs = [TensorSpec("completion", shape, TEXT), TensorSpec("tokens_generated", shape, "int32"),
                 TensorSpec("finish_reason", shape, TEXT)]
        if self.sampling.logprobs:
            specs.append(TensorSpec("logprobs", (*shape, None), "float32"))
        return tuple(specs)

    def load(self) -> LoadedGenerator:
        return LoadedGenerator(self)


class LoadedGenerator:
    """A loaded language model with its generation engine.  Thread-safe (the engine serializes calls).

    row_settings: the sampling settings a caller may set per row (the `parameters` input); `bulkinfer
    serve` takes them as an infer request's parameters.
    """

    row_settings = ROW_SETTINGS

    def __init__(self, spec: Generator):
        import jax
        import jax.numpy as jnp

        from bulkinfer.models import decoder

        t0 = time.perf_counter()
        self.spec = spec
        self.lm = spec.model.load()
        config = self.lm.config
        max_len = spec.max_len or min(config.max_position_embeddings, 1024)
        if config.model_type == "gpt2" and max_len > config.max_position_embeddings:
            # Learned positions: a table of n_positions rows, past which there is nothing to look up.
            raise ValueError(f"max_len {max_len} exceeds {spec.model.name}'s {config.max_position_embeddings} "
                             "learned positions (n_positions); pass --max-len at most that")
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[spec.dtype]
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), decoder.unstack_layers(self.lm.params))
        self.engine = GenerationEngine(
            functools.partial(decoder.forward, config=config), params,
            decoder.init_cache(config, slots=spec.slots, max_len=max_len, dtype=dtype),
            slots=spec.slots, max_len=max_len, vocab_size=config.vocab_size, prefill_lengths=spec.prefill_lengths,
            eos_token_ids=self.lm.eos_token_ids, decode=self.lm.decode)
        if spec.warmup:
            self.engine.warmup()
        self.name = spec.name
        self.inputs = spec.input_signature
        self.outputs = spec.output_signature()
        self.load_s = time.perf_counter() - t0

    def prompt_tokens(self, text: str) -> list[int]:
        """The token ids generated from: the text, or with chat its chat-template rendering."""
        if not self.spec.chat:
            return self.lm.encode(text)
        messages = ([{"role": "system", "content": self.spec.system}] if self.spec.system is not None else [])
        messages.append({"role": "user", "content": text})
        rendered = self.lm.apply_chat_template(messages, add_generation_prompt=True)
        return self.lm.encode(rendered, add_special_tokens=False)  # the template writes the special tokens

    def row_params(self, overrides: Sequence[Mapping | None] | None, n: int) -> list[SamplingParams]:
        """Each row's settings: the spec's, with that row's overrides (keys: ROW_SETTINGS).

        Raises ValueError naming the setting for an unknown key or a value out of range."""
        if overrides is None:
            return [self.spec.sampling] * n
        out = []
        for o in overrides:
            o = dict(o or {})
            unknown = sorted(set(o) - set(ROW_SETTINGS))
            if unknown:
                raise ValueError(f"unknown sampling settings {unknown}; allowed: {', '.join(ROW_SETTINGS)}")
            for key in ("stop", "stop_token_ids"):
                if isinstance(o.get(key), str | int):
                    o[key] = (o[key],)
            try:
                out.append(dataclasses.replace(self.spec.sampling, **o))
            except TypeError as e:
                raise ValueError(f"sampling settings {o}: {e}") from None
        return out

    def predict(self, inputs: Mapping[str, Sequence], stats=None) -> dict[str, np.ndarray]:
        """The model contract: {prompt: N texts, id: N keys[, parameters: N dicts]} -> {completion: [N]
        object, tokens_generated: [N] int32, finish_reason: [N] object[, logprobs: [N] object]}.

        Raises PromptError (a ValueError) for an empty or over-long prompt, before generating."""
        texts = list(inputs[self.spec.prompt_field])
        ids = list(inputs[self.spec.id_field]) if self.spec.id_field is not None else texts
        params = self.row_params(inputs.get(PARAMETERS), len(texts))
        prompts = [self.prompt_tokens(t) for t in texts]
        results = self.engine.generate(prompts, row_ids=ids, params=params, stats=stats)
        n = self.spec.sampling.n
        shape = (len(texts), n) if n > 1 else (len(texts),)
        completion = np.empty(shape, object)
        finish = np.empty(shape, object)
        generated = np.zeros(shape, np.int32)
        logprobs = np.empty(shape, object)
        for i, samples in enumerate(results):
            for j, c in enumerate(samples[:n] if n > 1 else samples[:1]):
                at = (i, j) if n > 1 else i
                completion[at], finish[at], generated[at] = c.text, c.finish_reason, len(c.tokens)
                logprobs[at] = np.asarray(c.logprobs or [], np.float32)
        out = {"completion": completion, "tokens_generated": generated, "finish_reason": finish}
        if self.spec.sampling.logprobs:
            out["logprobs"] = logprobs
        return out
