"""Sampling settings and the pure, jitted choice of each slot's next token.

    >>> params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=1)
    >>> tokens, logprobs = sample(logits, seen, SlotSettings.of([params] * S), keys, positions)

Every slot carries its own settings (arrays [S]), so rows with different settings share one compiled
decode step.  The processing order is Hugging Face `transformers`' (`generate`'s logits processors, then
its warpers): repetition penalty, temperature, top-k, top-p, min-p; temperature 0 is greedy (argmax of
the penalized logits).

Randomness is per row, never per slot or batch: a slot's key is `row_key(seed, row id, sample index)`,
folded with the position of the token being drawn (`jax.random.fold_in`), so a row's completion does not
depend on the batch it ran in, its slot, or the other rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one prompt's completions are drawn.

    max_new_tokens: completion tokens at most (finish_reason "length" when reached, or when the context
      is full first).
    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: all).  top_p: keep the smallest set of most likely tokens
      whose probability reaches p (1.0: all).  min_p: keep tokens at least min_p times as likely as the
      most likely one (0.0: all).
    repetition_penalty: HF's (`RepetitionPenaltyLogitsProcessor`, after Keskar et al. 2019, CTRL): over
      the tokens seen in prompt and completion, positive logits are divided by it and negative ones
      multiplied; 1.0 is off.
    stop_token_ids: tokens that end a completion (besides the model's EOS ids); they are not part of it.
    stop: strings that end a completion, checked on the decoded text; the completion ends before them.
    n: completions per prompt (sample index 0..n-1 enters the key).
    logprobs: also return each completion token's log-probability under the model (log-softmax of the
      raw logits, before any of the processing above).
    seed: with the row id and the sample index, the root of a completion's randomness.

    Raises ValueError naming the setting, its value and the allowed range.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 keeps all tokens)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1.0 is off)"),
            ("n", self.n >= 1, ">= 1"),
            ("seed", 0 <= self.seed < 2**63, "in [0, 2**63)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; it must be {allowed}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} holds an empty string, which would stop every completion at once")


@dataclasses.dataclass(frozen=True)
class SlotSettings:
    """Per-slot sampling settings as device-ready arrays, each [S]."""

    temperature: np.ndarray  # [S] float32; 0 = greedy
    top_k: np.ndarray  # [S] int32; 0 = off
    top_p: np.ndarray  # [S] float32
    min_p: np.ndarray  # [S] float32
    penalty: np.ndarray  # [S] float32

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SlotSettings:
        return cls(
            temperature=np.array([p.temperature for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int32),
            top_p=np.array([p.top_p for p in params], np.float32),
            min_p=np.array([p.min_p for p in params], np.float32),
            penalty=np.array([p.repetition_penalty for p in params], np.float32),
        )

    def set(self, slot: int, p: SamplingParams) -> None:
        """Writes one slot's settings in place (host arrays)."""
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = p.temperature, p.top_k, p.top_p
        self.min_p[slot], self.penalty[slot] = p.min_p, p.repetition_penalty

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.penalty)


def row_key(seed: int, row_id, sample: int) -> np.ndarray:
    """The root key of one completion: [2] uint32 from (seed, row id, sample index), whatever the batch.

    row_id: any value; its `str()` is hashed (BLAKE2b), so the ids 7 and "7" draw alike.
    """
    digest = hashlib.blake2b(str(row_id).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    high, low = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    key = jax.random.PRNGKey(seed)
    for data in (high, low, sample):
        key = jax.random.fold_in(key, data)
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF's repetition penalty: logits [S, V] float32, seen [S, V] bool, penalty [S] -> [S, V]."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits [S, V] with the tokens outside top-k, top-p and min-p set to -inf.

    Ties at a threshold are all kept (a threshold on values, as HF's top-k).
    """
    neg = jnp.finfo(logits.dtype).min
    ordered = -jnp.sort(-logits, axis=-1)  # [S, V] descending
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [S]
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [S, 1]
    ordered = jnp.where(ordered >= kth, ordered, neg)
    probs = jax.nn.softmax(ordered, axis=-1)  # [S, V] after top-k, as HF's warpers chain
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    keep = before < top_p[:, None]  # the most likely token is always kept
    last = jnp.sum(keep, axis=-1) - 1  # [S] index of the least likely kept token
    pth = jnp.take_along_axis(ordered, last[:, None], axis=-1)  # [S, 1]
    threshold = jnp.maximum(kth, pth)
    out = jnp.where(logits >= threshold, logits, -jnp.inf)
    # min-p on the top-k/top-p survivors: keep p >= min_p * p_max
    probs = jax.nn.softmax(out, axis=-1)
    pmax = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= min_p[:, None] * pmax, out, -jnp.inf)


def sample(logits: jax.Array, seen: jax.Array, settings: tuple[jax.Array, ...], keys: jax.Array,
           positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each slot's next token.

    logits [S, V] float32 (the model's, for the last token); seen [S, V] bool (tokens of prompt and
    completion so far, for the repetition penalty); settings: `SlotSettings.arrays()`; keys [S, 2]
    uint32 (`row_key`); positions [S] int32 (position of the token being drawn, folded into the key).
    Returns (tokens [S] int32, their log-probabilities under the raw logits [S] float32).
    """
    temperature, top_k, top_p, min_p, penalty = settings
    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    penalized = penalize(logits, seen, penalty)
    greedy = jnp.argmax(penalized, axis=-1).astype(jnp.int32)
    scaled = penalized / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = (top_k > 0) | (top_p < 1) | (min_p > 0)  # [S]
    filtered = jax.lax.cond(jnp.any(needs_filter), lambda x: filter_logits(x, top_k, top_p, min_p),
                            lambda x: x, scaled)
    filtered = jnp.where(needs_filter[:, None], filtered, scaled)  # a row's draw never depends on the others'
    step_keys = jax.vmap(jax.random.fold_in)(keys, positions.astype(jnp.uint32))  # [S, 2]
    # The draw (S x V Gumbel noise) runs only when some slot samples; a greedy slot takes its argmax either way.
    drawn = jax.lax.cond(jnp.any(temperature > 0),
                         lambda: jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32),
                         lambda: greedy)
    tokens = jnp.where(temperature > 0, drawn, greedy)
    return tokens, jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
