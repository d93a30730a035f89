"""The generation loop: cache and continuous batching against a full recompute, batch invariance of
sampled and greedy completions, no compile after warm-up, dead prompts, stop rules, sampling filters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bulkinfer.runtime.generate import Completion, GenerationEngine, PromptError
from bulkinfer.runtime.sampling import SamplingParams, filter_logits, penalize, row_key, sample

V, D, MAX_LEN = 37, 16, 48


def tiny_forward(params, tokens, positions, cache, slots):
    """A one-layer, one-head decoder under the decoder contract (bulkinfer.models.decoder.forward):
    tokens, positions [B, T] int32, slots [B] int32 or None; cache {"k", "v": [1, S, max_len, 1, D]}."""
    max_len = cache["k"].shape[2]
    if slots is None:  # row b uses cache row b
        slots = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    x = params["emb"][tokens]  # [B, T, D]
    q, k, v = x @ params["wq"], x @ params["wk"], x @ params["wv"]  # [B, T, D]
    where = jnp.where((positions >= 0) & (positions < max_len), positions, max_len)  # [B, T]
    rows = jnp.broadcast_to(slots[:, None], positions.shape)
    ck = cache["k"].at[0, rows, where, 0].set(k, mode="drop")
    cv = cache["v"].at[0, rows, where, 0].set(v, mode="drop")
    kc, vc = ck[0, slots, :, 0], cv[0, slots, :, 0]  # [B, max_len, D]
    scores = jnp.einsum("btd,bsd->bts", q, kc) / np.sqrt(D)
    allowed = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]  # [B, T, max_len]
    scores = jnp.where(allowed, scores, -1e30)
    out = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), vc)
    logits = jnp.tanh(x + out) @ params["out"] * 3.0  # [B, T, V]
    return logits, {"k": ck, "v": cv}


@pytest.fixture(scope="module")
def params():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shapes = {"emb": (V, D), "wq": (D, D), "wk": (D, D), "wv": (D, D), "out": (D, V)}
    return {name: jax.random.normal(k, shape, jnp.float32) for (name, shape), k in zip(shapes.items(), keys)}


def make_engine(params, slots, **kw):
    cache = {"k": jnp.zeros((1, slots, MAX_LEN, 1, D)), "v": jnp.zeros((1, slots, MAX_LEN, 1, D))}
    kw.setdefault("decode", lambda ids: "".join(chr(97 + t % 26) for t in ids))
    return GenerationEngine(tiny_forward, params, cache, slots=slots, max_len=MAX_LEN,
                            prefill_lengths=(4, 8, 16), **kw)


@pytest.fixture(scope="module")
def engines(params):
    return {s: make_engine(params, s) for s in (1, 3, 16)}


def prompts_of(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, size=int(rng.integers(1, 20))).tolist() for _ in range(n)]


@jax.jit
def _full_logits(params, tokens, length):
    """Logits [MAX_LEN, V] of one sequence run from scratch (tokens [MAX_LEN], the first `length` real)."""
    cache = {"k": jnp.zeros((1, 1, MAX_LEN, 1, D)), "v": jnp.zeros((1, 1, MAX_LEN, 1, D))}
    positions = jnp.where(jnp.arange(MAX_LEN) < length, jnp.arange(MAX_LEN), MAX_LEN)
    logits, _ = tiny_forward(params, tokens[None], positions[None].astype(jnp.int32), cache, jnp.zeros(1, jnp.int32))
    return logits[0]


def full_logits(params, seq):
    return _full_logits(params, jnp.asarray(seq + [0] * (MAX_LEN - len(seq)), jnp.int32), len(seq))[:len(seq)]


def full_recompute_greedy(params, prompt, steps):
    """Greedy decoding by running the whole sequence again for every token (no cache reuse)."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(full_logits(params, seq)[-1])))
    return seq[len(prompt):]


def test_greedy_matches_full_recompute_with_slots_reused(params, engines):
    prompts = prompts_of(7)  # 7 rows through 3 slots: slots are refilled while others decode
    out = engines[3].generate(prompts, row_ids=list(range(7)),
                              params=SamplingParams(temperature=0, max_new_tokens=6))
    for p, [c] in zip(prompts, out):
        assert c.tokens == full_recompute_greedy(params, p, 6)
        assert c.finish_reason == "length"


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.05,
                                                                 repetition_penalty=1.3)])
def test_completions_do_not_depend_on_batch_slot_or_order(engines, settings):
    prompts = prompts_of(16, seed=2)
    ids = [f"row-{i}" for i in range(16)]
    per_row = [SamplingParams(max_new_tokens=3 + i % 9, seed=7, logprobs=True, **settings) for i in range(16)]

    def tokens(out):
        return [[c.tokens for c in samples] for samples in out]

    batched = {s: tokens(engines[s].generate(prompts, row_ids=ids, params=per_row)) for s in (3, 16)}
    alone = [tokens(engines[1].generate([p], row_ids=[i], params=[q]))[0] for p, i, q in zip(prompts, ids, per_row)]
    in_threes = [t for k in range(0, 16, 3)
                 for t in tokens(engines[16].generate(prompts[k:k + 3], row_ids=ids[k:k + 3], params=per_row[k:k + 3]))]
    backwards = tokens(engines[3].generate(prompts[::-1], row_ids=ids[::-1], params=per_row[::-1]))[::-1]
    assert batched[3] == batched[16] == alone == in_threes == backwards
    assert len({tuple(t[0]) for t in alone}) > 8  # rows differ from each other


def test_sampled_rows_differ_by_id_and_sample_but_repeat_with_the_seed(engines):
    prompt = prompts_of(1, seed=3)[0]
    p = SamplingParams(temperature=3.0, max_new_tokens=16, n=3, seed=11)
    [a], [b] = engines[3].generate([prompt], row_ids=["x"], params=p), engines[3].generate([prompt], row_ids=["y"], params=p)
    assert len({tuple(c.tokens) for c in a + b}) == 6
    [again] = engines[16].generate([prompt], row_ids=["x"], params=p)
    assert [c.tokens for c in again] == [c.tokens for c in a]
    [other_seed] = engines[16].generate([prompt], row_ids=["x"], params=dataclasses_replace(p, seed=12))
    assert [c.tokens for c in other_seed] != [c.tokens for c in a]


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_no_compile_after_warmup(params):
    engine = make_engine(params, 4)
    engine.warmup()
    assert engine.stats.compiles == 1 + len(engine.prefill_lengths)  # the decode step and each bucket
    before = engine.stats.compiles
    engine.generate(prompts_of(9, seed=4) + [[1] * 30, [2] * 46], row_ids=list(range(11)),
                    params=SamplingParams(temperature=0.5, max_new_tokens=5))
    assert engine.stats.compiles == before


def test_too_long_prompt_is_an_error_naming_row_and_length(engines):
    with pytest.raises(PromptError, match=r"prompt 1: the prompt has 48 tokens.*context of 48") as e:
        engines[3].generate([[1, 2], [3] * MAX_LEN], row_ids=[0, 1])
    assert e.value.row == 1
    with pytest.raises(PromptError, match="^the prompt has no tokens$"):
        engines[3].generate([[]], row_ids=[0])
    with pytest.raises(PromptError, match=f"token id {V} is outside the vocabulary"):
        engines[3].generate([[V]], row_ids=[0])


def test_context_fills_up_with_finish_reason_length(engines):
    [[c]] = engines[3].generate([[5] * (MAX_LEN - 1)], row_ids=[0], params=SamplingParams(max_new_tokens=50))
    assert (len(c.tokens), c.finish_reason) == (1, "length")
    [[c]] = engines[3].generate([[5] * (MAX_LEN - 4)], row_ids=[0], params=SamplingParams(max_new_tokens=50))
    assert (len(c.tokens), c.finish_reason) == (4, "length")


def test_stop_token_and_stop_string(params, engines):
    prompt = prompts_of(1, seed=5)[0]
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    [[free]] = engines[3].generate([prompt], row_ids=[0], params=greedy)
    assert len(free.tokens) == 12
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    [[c]] = engines[3].generate([prompt], row_ids=[0], params=dataclasses_replace(greedy, stop_token_ids=(stop_at,)))
    assert (c.tokens, c.finish_reason) == (free.tokens[:first], "stop")
    eos_engine = make_engine(params, 2, eos_token_ids=(stop_at,))
    [[c]] = eos_engine.generate([prompt], row_ids=[0], params=greedy)
    assert (c.tokens, c.finish_reason) == (free.tokens[:first], "stop")
    stop = free.text[5:7]
    [[c]] = engines[3].generate([prompt], row_ids=[0], params=dataclasses_replace(greedy, stop=(stop,)))
    cut = free.text.index(stop)
    assert (c.text, c.finish_reason) == (free.text[:cut], "stop")
    assert c.tokens == free.tokens[:len(c.tokens)] and len(c.tokens) <= 7


def test_logprobs_are_the_models_log_softmax(params, engines):
    prompt = prompts_of(1, seed=6)[0]
    [[c]] = engines[3].generate([prompt], row_ids=[0], params=SamplingParams(temperature=0.7, max_new_tokens=4,
                                                                                logprobs=True))
    seq = prompt + c.tokens
    lp = jax.nn.log_softmax(full_logits(params, seq), axis=-1)
    expected = [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(c.tokens)]
    np.testing.assert_allclose(c.logprobs, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(c, Completion)


def test_sampling_params_are_checked():
    with pytest.raises(ValueError, match=r"top_p=0 is out of range; it must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="empty string"):
        SamplingParams(stop=("",))


def test_repetition_penalty_is_hfs_definition():
    logits = jnp.asarray([[2.0, -2.0, 1.0]])
    seen = jnp.asarray([[True, True, False]])
    np.testing.assert_allclose(penalize(logits, seen, jnp.asarray([2.0])), [[1.0, -4.0, 1.0]])


def test_filters_keep_top_k_top_p_and_min_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]] * 3))
    kept = filter_logits(logits, jnp.asarray([2, 0, 0]), jnp.asarray([1.0, 0.8, 1.0]), jnp.asarray([0.0, 0.0, 0.35]))
    finite = np.isfinite(np.asarray(kept))
    assert finite.tolist() == [[True, True, False, False],  # top-2
                               [True, True, True, False],  # 0.5 + 0.25 < 0.8, so 0.15 is needed
                               [True, True, False, False]]  # p >= 0.35 * 0.5


def test_a_filtered_row_does_not_change_an_unfiltered_one():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 50)) * 5
    keys = jnp.asarray(np.stack([row_key(0, "a", 0)] * 2))
    seen = jnp.zeros((2, 50), bool)
    pos = jnp.asarray([3, 3])
    plain = (jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2), jnp.zeros(2), jnp.ones(2))
    mixed = (jnp.ones(2), jnp.asarray([0, 5], jnp.int32), jnp.ones(2), jnp.zeros(2), jnp.ones(2))
    a, _ = sample(logits, seen, plain, keys, pos)
    b, _ = sample(logits, seen, mixed, keys, pos)
    assert int(a[0]) == int(b[0])


def test_row_key_depends_on_seed_id_and_sample_only():
    assert (row_key(1, 7, 0) == row_key(1, "7", 0)).all()
    assert len({row_key(s, i, j).tobytes() for s in (1, 2) for i in ("a", "b") for j in (0, 1)}) == 8


LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True}


def test_llama_decoder_greedy_and_sampled_rows_match_across_batchings():
    """The real decoder (tiny random Llama: GQA, tied embeddings): greedy equals a full recompute, and
    sampled rows are the same alone, with 3 slots and with 8, in another order."""
    from bulkinfer.models import decoder

    config = decoder.DecoderConfig.from_hf(LLAMA)
    params = jax.device_put(decoder.params_from_hf(config, decoder.random_hf_tensors(config, seed=1, std=0.2)))
    forward = functools.partial(decoder.forward, config=config)

    def engine(slots):
        return GenerationEngine(forward, params, decoder.init_cache(config, slots=slots, max_len=40), slots=slots,
                                max_len=40, prefill_lengths=(8, 16))

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 64, size=int(rng.integers(1, 14))).tolist() for _ in range(8)]
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    three, eight = engine(3), engine(8)
    out = three.generate(prompts, row_ids=list(range(8)), params=greedy)

    @jax.jit
    def from_scratch(tokens, length):  # tokens [40], the first `length` real: logits [40, V], no cache reuse
        positions = jnp.where(jnp.arange(40) < length, jnp.arange(40), 40)[None].astype(jnp.int32)
        logits, _ = decoder.forward(params, tokens[None], positions, decoder.init_cache(config, slots=1, max_len=40),
                                    jnp.zeros(1, jnp.int32), config=config)
        return logits[0]

    for p, [c] in zip(prompts[:4], out):
        seq = list(p)
        for _ in range(6):
            logits = from_scratch(jnp.asarray(seq + [0] * (40 - len(seq)), jnp.int32), len(seq))
            seq.append(int(jnp.argmax(logits[len(seq) - 1])))
        assert c.tokens == seq[len(p):]
    sampled = [SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=2 + i, seed=5) for i in range(8)]
    ids = [f"r{i}" for i in range(8)]
    a = [c.tokens for [c] in three.generate(prompts, row_ids=ids, params=sampled)]
    b = [c.tokens for [c] in eight.generate(prompts[::-1], row_ids=ids[::-1], params=sampled[::-1])][::-1]
    alone = [c.tokens for k in range(8) for [c] in eight.generate([prompts[k]], row_ids=[ids[k]], params=[sampled[k]])]
    assert a == b == alone
    assert len({tuple(t) for t in a}) == 8
