"""Decoder LMs (models/decoder.py): the slot KV cache's semantics, configs and weight checks.

Cache tests use a tiny random Llama (GQA: 4 heads over 2 kv heads, tied embeddings).  Tolerances are
float32 ones (atol 1e-5) where two computations differ only in the order of float operations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bulkinfer.models import decoder

LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
}
ATOL = 1e-5


def _model(hf: dict, seed: int = 0):
    config = decoder.DecoderConfig.from_hf(hf)
    params = decoder.params_from_hf(config, decoder.random_hf_tensors(config, seed=seed, std=0.2))
    return config, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def llama():
    return _model(LLAMA)


_forward = jax.jit(decoder.forward, static_argnames="config")


def _i32(x):
    return jnp.asarray(np.asarray(x, dtype=np.int32))


def test_prefill_equals_token_by_token_decode(llama):
    config, params = llama
    tokens = [5, 9, 2, 33, 7, 1, 60]
    cache = decoder.init_cache(config, slots=3, max_len=16)
    prefill, cache_prefill = _forward(params, _i32([tokens]), _i32([range(7)]), cache, _i32([2]), config=config)
    steps, cache_steps = [], cache
    for t, tok in enumerate(tokens):
        logits, cache_steps = _forward(params, _i32([[tok]]), _i32([[t]]), cache_steps, _i32([2]), config=config)
        steps.append(np.asarray(logits[0, 0]))
    assert prefill.shape == (1, 7, 64) and prefill.dtype == jnp.float32
    np.testing.assert_allclose(np.stack(steps), np.asarray(prefill[0]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cache_steps["k"]), np.asarray(cache_prefill["k"]), atol=ATOL, rtol=0)
    # Only slot 2, positions 0..6 were written.
    written = np.abs(np.asarray(cache_prefill["k"])).sum(axis=(0, 3, 4))  # [slots, max_len]
    assert (written[2, :7] > 0).all() and written[2, 7:].sum() == 0 and written[:2].sum() == 0


def test_padding_positions_write_nothing_and_do_not_change_real_logits(llama):
    config, params = llama
    cache = decoder.init_cache(config, slots=2, max_len=8)
    plain, plain_cache = _forward(params, _i32([[3, 4, 5]]), _i32([[0, 1, 2]]), cache, _i32([0]), config=config)
    # The same row padded at both ends (positions -1 and max_len), next to an all-padding row on slot 1.
    tokens = _i32([[9, 3, 4, 5, 9], [1, 1, 1, 1, 1]])
    positions = _i32([[-1, 0, 1, 2, 8], [-1, -1, 8, 9, 100]])
    padded, padded_cache = _forward(params, tokens, positions, cache, _i32([0, 1]), config=config)
    np.testing.assert_allclose(np.asarray(padded[0, 1:4]), np.asarray(plain[0]), atol=ATOL, rtol=0)
    for name in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(padded_cache[name][:, 1]), 0)  # slot 1: nothing written
        np.testing.assert_allclose(np.asarray(padded_cache[name]), np.asarray(plain_cache[name]), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(padded_cache[name][:, 0, 3:]), 0)


def test_rows_of_a_batch_are_independent_sequences(llama):
    """Two prompts prefilled together on slots 1 and 0, then decoded together, equal each one alone."""
    config, params = llama
    a, b = [7, 8, 9, 10], [11, 12, 13, 14]
    cache = decoder.init_cache(config, slots=2, max_len=8)
    both, both_cache = _forward(params, _i32([a, b]), _i32([range(4), range(4)]), cache, _i32([1, 0]), config=config)
    alone_a, _ = _forward(params, _i32([a]), _i32([range(4)]), cache, _i32([1]), config=config)
    alone_b, _ = _forward(params, _i32([b]), _i32([range(4)]), cache, _i32([0]), config=config)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(alone_a[0]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(alone_b[0]), atol=ATOL, rtol=0)
    # A decode step over all slots, rows listed in slot order, with different positions per row.
    step, _ = _forward(params, _i32([[20], [21]]), _i32([[4], [4]]), both_cache, _i32([0, 1]), config=config)
    full_b, _ = _forward(params, _i32([b + [20]]), _i32([range(5)]), cache, _i32([0]), config=config)
    full_a, _ = _forward(params, _i32([a + [21]]), _i32([range(5)]), cache, _i32([1]), config=config)
    np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(full_b[0, 4]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(full_a[0, 4]), atol=ATOL, rtol=0)


def test_a_reused_slot_ignores_the_previous_sequence(llama):
    config, params = llama
    cache = decoder.init_cache(config, slots=1, max_len=8)
    _, used = _forward(params, _i32([[1, 2, 3, 4, 5, 6]]), _i32([range(6)]), cache, _i32([0]), config=config)
    fresh, _ = _forward(params, _i32([[40, 41]]), _i32([[0, 1]]), cache, _i32([0]), config=config)
    reused, _ = _forward(params, _i32([[40, 41]]), _i32([[0, 1]]), used, _i32([0]), config=config)
    np.testing.assert_allclose(np.asarray(reused), np.asarray(fresh), atol=ATOL, rtol=0)


def test_grouped_query_attention_equals_repeated_kv_heads(llama):
    """GQA with 2 kv heads equals multi-head attention whose k/v heads repeat each kv head twice."""
    config, params = llama
    mha = decoder.DecoderConfig.from_hf({**LLAMA, "num_key_value_heads": 4})
    hd = config.head_dim

    def repeat(w):  # [N, D, 2*Dh] -> [N, D, 4*Dh]: kv head j serves query heads 2j and 2j+1
        n, d, _ = w.shape
        return jnp.repeat(w.reshape(n, d, 2, hd), 2, axis=2).reshape(n, d, 4 * hd)

    mha_params = {**params, "layers": {**params["layers"], "k_w": repeat(params["layers"]["k_w"]),
                                       "v_w": repeat(params["layers"]["v_w"])}}
    tokens, positions, slots = _i32([[3, 1, 4, 1, 5]]), _i32([range(5)]), _i32([0])
    gqa, _ = _forward(params, tokens, positions, decoder.init_cache(config, slots=1, max_len=8), slots, config=config)
    ref, _ = _forward(mha_params, tokens, positions, decoder.init_cache(mha, slots=1, max_len=8), slots, config=mha)
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(ref), atol=ATOL, rtol=0)


def test_config_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="model_type 'falcon'.*llama, mistral, qwen2, gpt2"):
        decoder.DecoderConfig.from_hf({**LLAMA, "model_type": "falcon"})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        decoder.DecoderConfig.from_hf({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="lacks the field 'intermediate_size'"):
        decoder.DecoderConfig.from_hf({k: v for k, v in LLAMA.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        decoder.DecoderConfig.from_hf({**LLAMA, "num_key_value_heads": 3})


def test_params_from_hf_names_missing_unexpected_and_misshapen_tensors():
    config = decoder.DecoderConfig.from_hf(LLAMA)
    tensors = decoder.random_hf_tensors(config)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        decoder.params_from_hf(config, missing)
    with pytest.raises(ValueError, match=r"unexpected tensors model\.layers\.2\.mlp\.up_proj\.weight"):
        decoder.params_from_hf(config, {**tensors, "model.layers.2.mlp.up_proj.weight": np.zeros((48, 32))})
    wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: \(32, 32\) \(expected \(16, 32\)\)"):
        decoder.params_from_hf(config, wrong)
