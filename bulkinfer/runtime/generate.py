"""The generation loop: prefill into a preallocated KV cache, a jitted decode step over a fixed number of
slots, and continuous batching (a finished row's slot takes the next waiting prompt at once).

    >>> engine = GenerationEngine(functools.partial(decoder.forward, config=config), params,
    ...                           decoder.init_cache(config, slots=8, max_len=512), slots=8, max_len=512,
    ...                           eos_token_ids=(2,), decode=tokenizer.decode)
    >>> [[c]] = engine.generate([[1, 15, 27]], row_ids=["a"], params=SamplingParams(temperature=0))
    >>> c.tokens, c.finish_reason, c.text
    ([31, 8, 2], 'stop', '...')

`forward(params, tokens [B, T] int32, positions [B, T] int32, cache, slots [B] int32) -> (logits
[B, T, V] float32, cache)` is the decoder contract (`bulkinfer.models.decoder.forward` with its config
bound): row b's token t sits at position positions[b, t] of cache row slots[b] (slots None: of cache row
b, for a decode step over every slot); a position outside [0, max_len) is padding (nothing written).

Static and dynamic, and why a row's completion does not depend on its batch:
- Prefill runs one prompt per call, [1, T] with T its own length bucket (`prefill_lengths`), into its
  slot's cache row.  A prompt always meets the same shape, whatever else is in the batch.
- Decode runs all S slots every step, [S, 1], one shape for the whole run; free slots sit at a padding
  position.  Each row attends only its own cache row, so the other slots do not enter its numbers.
- Sampling (`runtime.sampling`) draws with the key (seed, row id, sample index) folded with the token's
  position, never the slot or the step.
So a row gives the same tokens alone, in any batch and in any order (tests/runtime/test_generate.py).

Compiles: one per prefill bucket used, plus one decode step (`stats.compiles`); `warmup()` does them
all, after which nothing compiles.  The cache and the seen-token mask are donated to each step.
The prompt's last token is not prefilled: it is the first decode step's input, so every token,
the first included, is drawn by the same decode step.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bulkinfer.runtime.sampling import SamplingParams, SlotSettings, row_key, sample
from bulkinfer.runtime.stats import EngineStats

_DEFAULT = SamplingParams()
DEFAULT_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, or too long for the context): the row's fault.

    row: its index in the call (named in the message when the call had several prompts).  Raised before
    anything runs, so no other row's work is lost.
    """

    def __init__(self, row: int, message: str, *, prompts: int = 2):
        super().__init__(f"prompt {row}: {message}" if prompts > 1 else message)
        self.row = row


@dataclasses.dataclass
class Completion:
    """One sampled completion.

    tokens: generated token ids (a stop token id is not included; the token that completed a stop
      string is).  text: the decoded completion, cut before a stop string (None without `decode`).
    finish_reason: "stop" (EOS, a stop token id or a stop string) or "length" (max_new_tokens, or the
      context is full).  logprobs: per token, its log-probability under the model, when asked for.
    """

    tokens: list[int]
    finish_reason: str
    text: str | None = None
    logprobs: list[float] | None = None


@dataclasses.dataclass
class _Slot:
    row: int
    sample: int
    params: SamplingParams
    tokens: list[int]
    logprobs: list[float]
    text_checked: int = 0  # completion characters already searched for stop strings


class GenerationEngine:
    """Generates completions for token-id prompts with a fixed number of KV-cache slots.

    forward: the decoder contract above, settings bound (functools.partial); jitted here with the
      cache donated.  params: its parameter pytree (passed to every call, never captured).
    cache: the empty cache pytree for `slots` rows of `max_len` positions (`decoder.init_cache`).
    slots: rows decoded together (the decode step's batch).  max_len: positions per cache row.
    vocab_size: logits width, for the repetition-penalty mask (default: from one trace of forward).
    prefill_lengths: prompt-length buckets; those above max_len are dropped and max_len is added.
    eos_token_ids: tokens that end every completion ("stop"), besides each request's stop_token_ids.
    decode: token ids -> text; needed for stop strings and to fill `Completion.text`.

    Thread-safe: `generate` calls are serialized (one stream of steps on the devices).
    """

    def __init__(self, forward: Callable, params, cache, *, slots: int, max_len: int, vocab_size: int | None = None,
                 prefill_lengths: Sequence[int] = DEFAULT_PREFILL_LENGTHS, eos_token_ids: Sequence[int] = (),
                 decode: Callable[[list[int]], str] | None = None):
        if slots < 1 or max_len < 2:
            raise ValueError(f"slots must be >= 1 and max_len >= 2, got slots={slots}, max_len={max_len}")
        self.slots, self.max_len = slots, max_len
        self.prefill_lengths = tuple(sorted({n for n in prefill_lengths if n < max_len} | {max_len}))
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._decode = decode
        self._forward = forward
        self._params = jax.device_put(params)
        self._cache = cache
        if vocab_size is None:
            logits, _ = jax.eval_shape(forward, self._params, jax.ShapeDtypeStruct((1, 1), jnp.int32),
                                       jax.ShapeDtypeStruct((1, 1), jnp.int32), cache,
                                       jax.ShapeDtypeStruct((1,), jnp.int32))
            vocab_size = int(logits.shape[-1])
        self.vocab_size = vocab_size
        self._seen = jnp.zeros((slots, vocab_size), bool)  # [S, V] tokens of each slot's prompt and completion
        # Static: T of each prefill bucket, S.  Dynamic: everything else.  Donated: cache, seen.
        self._prefill_jit = jax.jit(self._prefill_fn, donate_argnums=(1, 2))
        self._step_jit = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self._prefill_exe: dict[int, Callable] = {}
        self._step_exe: Callable | None = None
        self._lock = threading.Lock()
        self.stats = EngineStats()

    # -- the pure, jitted functions -------------------------------------------------------------------
    def _prefill_fn(self, params, cache, seen, tokens, positions, slot):
        """tokens [1, T] int32 (-1 after the prompt), positions [1, T] int32 (max_len = padding; the
        prompt's last token is padding too); slot [1] int32.
        Writes the prompt's k/v into the slot's cache row and marks its tokens seen."""
        _, cache = self._forward(params, jnp.maximum(tokens, 0), positions, cache, slot)
        row = jnp.zeros((self.vocab_size,), bool)
        mark = jnp.where(tokens[0] >= 0, tokens[0], self.vocab_size)  # [T]; -1 = filler, dropped
        row = row.at[mark].set(True, mode="drop")
        return cache, seen.at[slot[0]].set(row)

    def _step_fn(self, params, cache, seen, tokens, positions, keys, settings):
        """One decode step over all S slots: tokens, positions [S] int32 (free slots at max_len);
        keys [S, 2] uint32; settings: SlotSettings arrays.  Returns (next tokens [S], logprobs [S], cache, seen)."""
        slots = jnp.arange(self.slots, dtype=jnp.int32)
        live = positions < self.max_len
        seen = seen.at[slots, jnp.where(live, tokens, self.vocab_size)].set(True, mode="drop")
        # slots=None: row s is slot s, so the step reads each slot's cache in place.
        logits, cache = self._forward(params, tokens[:, None], positions[:, None], cache, None)  # [S, 1, V]
        nxt, logprobs = sample(logits[:, 0], seen, settings, keys, positions + 1)
        return nxt, logprobs, cache, seen

    # -- compiles ---------------------------------------------------------------------------------------
    def _prefill_executable(self, length: int) -> Callable:
        exe = self._prefill_exe.get(length)
        if exe is None:
            t0 = time.perf_counter()
            spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
            exe = self._prefill_jit.lower(self._params, self._cache, self._seen, spec, spec,
                                          jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
            self._prefill_exe[length] = exe
            self._count_compile(t0)
        return exe

    def _step_executable(self) -> Callable:
        if self._step_exe is None:
            t0 = time.perf_counter()
            s = jax.ShapeDtypeStruct((self.slots,), jnp.int32)
            f = jax.ShapeDtypeStruct((self.slots,), jnp.float32)
            settings = (f, s, f, f, f)
            self._step_exe = self._step_jit.lower(self._params, self._cache, self._seen, s, s,
                                                  jax.ShapeDtypeStruct((self.slots, 2), jnp.uint32),
                                                  settings).compile()
            self._count_compile(t0)
        return self._step_exe

    def _count_compile(self, t0: float) -> None:
        self.stats.compiles += 1
        self.stats.compile_s += time.perf_counter() - t0

    def warmup(self) -> None:
        """Compiles the decode step and every prefill bucket, so nothing compiles while rows flow."""
        with self._lock:
            self._step_executable()
            for length in self.prefill_lengths:
                self._prefill_executable(length)

    def bucket(self, length: int) -> int:
        """The prefill length a prompt of `length` tokens runs at."""
        return next(n for n in self.prefill_lengths if n >= length)

    # -- the loop ---------------------------------------------------------------------------------------
    def check(self, prompt: Sequence[int]) -> str | None:
        """Why this prompt cannot be generated from, or None."""
        if len(prompt) == 0:
            return "the prompt has no tokens"
        if len(prompt) + 1 > self.max_len:
            return (f"the prompt has {len(prompt)} tokens; with at least one generated token that exceeds the "
                    f"context of {self.max_len} tokens; shorten it (it is never truncated)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        return None

    def generate(self, prompts: Sequence[Sequence[int]], *, row_ids: Sequence, params: SamplingParams
                 | Sequence[SamplingParams] = _DEFAULT, stats: EngineStats | None = None
                 ) -> list[list[Completion]]:
        """For each prompt, its `params.n` completions, in input order.

        prompts: token ids per row.  row_ids: one id per row (any value; its str() keys the row's
        randomness).  params: one SamplingParams for all rows, or one per row.
        stats: receives this call's counts: rows; batches = prefills + decode steps; real_tokens =
          tokens generated; padded_tokens = slots x decode steps (their ratio is slot occupancy);
          compiles; run_s.

        Raises PromptError (a ValueError naming the row) for the first prompt that is empty, too long or
        holds a token outside the vocabulary, before anything runs.
        """
        n = len(prompts)
        per_row = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(row_ids) != n or len(per_row) != n:
            raise ValueError(f"{n} prompts need {n} row_ids and params, got {len(row_ids)} and {len(per_row)}")
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            why = self.check(p)
            if why is not None:
                raise PromptError(i, why, prompts=n)
        with self._lock:
            return self._generate_locked(prompts, list(row_ids), per_row, stats)

    def _generate_locked(self, prompts, row_ids, per_row, stats) -> list[list[Completion]]:
        t0 = time.perf_counter()
        compiles, compile_s = self.stats.compiles, self.stats.compile_s
        call = EngineStats(rows=len(prompts))
        results: list[list[Completion | None]] = [[None] * p.n for p in per_row]
        waiting = collections.deque((i, j) for i, p in enumerate(per_row) for j in range(p.n))
        S, free_pos = self.slots, self.max_len
        tokens = np.zeros(S, np.int32)
        positions = np.full(S, free_pos, np.int32)  # position of each slot's next input token
        keys = np.zeros((S, 2), np.uint32)
        settings = SlotSettings.of([SamplingParams()] * S)
        owner: list[_Slot | None] = [None] * S
        step = self._step_executable()
        while waiting or any(o is not None for o in owner):
            for s in range(S):
                if owner[s] is None and waiting:
                    i, j = waiting.popleft()
                    self._prefill(prompts[i], s)
                    call.batches += 1
                    p = per_row[i]
                    owner[s] = _Slot(i, j, p, [], [])
                    tokens[s], positions[s] = prompts[i][-1], len(prompts[i]) - 1
                    keys[s] = row_key(p.seed, row_ids[i], j)
                    settings.set(s, p)
            nxt, logprobs, self._cache, self._seen = step(self._params, self._cache, self._seen, tokens, positions,
                                                          keys, settings.arrays())
            nxt, logprobs = np.asarray(nxt), np.asarray(logprobs)
            call.batches += 1
            call.padded_tokens += S
            for s in range(S):
                slot = owner[s]
                if slot is None:
                    continue
                reason = self._advance(slot, int(nxt[s]), float(logprobs[s]), int(positions[s]) + 1)
                call.real_tokens += reason != "stop-token"
                if reason is None:
                    tokens[s], positions[s] = nxt[s], positions[s] + 1
                    continue
                results[slot.row][slot.sample] = self._finish(slot, "stop" if reason == "stop-token" else reason)
                owner[s] = None
                positions[s] = free_pos
        call.compiles = self.stats.compiles - compiles
        call.compile_s = self.stats.compile_s - compile_s
        call.run_s = time.perf_counter() - t0
        call.busy_s = call.run_s - call.compile_s
        self.stats.add(call, compiles=False)
        if stats is not None:
            stats.add(call)
        return results

    def _prefill(self, prompt: list[int], slot: int) -> None:
        """Writes prompt[:-1]'s k/v into the slot's cache row (the last token is the first decode input)
        and marks all of the prompt's tokens seen."""
        length = self.bucket(len(prompt))
        tokens = np.full((1, length), -1, np.int32)
        tokens[0, :len(prompt)] = prompt
        positions = np.full((1, length), self.max_len, np.int32)
        positions[0, :len(prompt) - 1] = np.arange(len(prompt) - 1)
        exe = self._prefill_executable(length)
        self._cache, self._seen = exe(self._params, self._cache, self._seen, tokens, positions,
                                      np.array([slot], np.int32))

    def _advance(self, slot: _Slot, token: int, logprob: float, position: int) -> str | None:
        """Takes the token drawn at `position`; returns why the completion ends now, or None."""
        p = slot.params
        if token in self.eos_token_ids or token in p.stop_token_ids:
            return "stop-token"
        slot.tokens.append(token)
        slot.logprobs.append(logprob)
        if p.stop and self._stop_string(slot) is not None:
            return "stop"
        if len(slot.tokens) >= p.max_new_tokens or position >= self.max_len - 1:
            return "length"
        return None

    def _stop_string(self, slot: _Slot) -> int | None:
        """Where the first stop string starts in the completion's text, or None."""
        if self._decode is None:
            raise ValueError("stop strings need the engine's decode function (token ids -> text)")
        text = self._decode(slot.tokens)
        start = max(0, slot.text_checked - max(len(s) for s in slot.params.stop))
        hits = [k for k in (text.find(s, start) for s in slot.params.stop) if k >= 0]
        slot.text_checked = len(text)
        return min(hits) if hits else None

    def _finish(self, slot: _Slot, reason: str) -> Completion:
        text = None
        if self._decode is not None:
            text = self._decode(slot.tokens)
            if slot.params.stop:
                hits = [k for k in (text.find(s) for s in slot.params.stop) if k >= 0]
                text = text[:min(hits)] if hits else text
        return Completion(tokens=slot.tokens, finish_reason=reason, text=text,
                          logprobs=slot.logprobs if slot.params.logprobs else None)
