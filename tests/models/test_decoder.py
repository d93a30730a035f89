"""Decoder LMs (models/decoder.py): the slot KV cache's semantics, configs and weight checks.

Cache tests use a tiny random Llama (GQA: 4 heads over 2 kv heads, tied embeddings).  Tolerances are
float32 ones (atol 1e-5) where two computations differ only in the order of float operations.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bulkinfer.models import decoder
from bulkinfer.models.checkpoint import CheckpointError
from bulkinfer.models.lm import LanguageModel

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


def _by_position(cache, name):
    """A cache array as [layers, slots, max_len, kv_heads, head_dim] (keys store positions last)."""
    array = np.asarray(cache[name])
    return np.moveaxis(array, -1, 2) if name == "k" else array


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
    written = np.abs(_by_position(cache_prefill, "k")).sum(axis=(0, 3, 4))  # [slots, max_len]
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
        np.testing.assert_array_equal(_by_position(padded_cache, name)[:, 0, 3:], 0)


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


def test_kv_len_attends_over_a_prefix_of_the_cache_with_the_same_logits(llama):
    config, params = llama
    cache = decoder.init_cache(config, slots=2, max_len=16)
    tokens, positions, slots = _i32([[3, 1, 4, 1, 5]]), _i32([range(5)]), _i32([1])
    full, full_cache = _forward(params, tokens, positions, cache, slots, config=config)
    short = jax.jit(decoder.forward, static_argnames=("config", "kv_len"))
    part, part_cache = short(params, tokens, positions, cache, slots, config=config, kv_len=8)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(part_cache["k"]), np.asarray(full_cache["k"]))
    step_full, _ = _forward(params, _i32([[9], [2]]), _i32([[5], [-1]]), full_cache, _i32([1, 0]), config=config)
    step_part, _ = short(params, _i32([[9], [2]]), _i32([[5], [-1]]), part_cache, _i32([1, 0]), config=config,
                         kv_len=6)
    np.testing.assert_allclose(np.asarray(step_part[0]), np.asarray(step_full[0]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"kv_len 17 must be in \[1, max_len=16\]"):
        decoder.forward(params, tokens, positions, cache, slots, config=config, kv_len=17)


def test_chunked_attention_and_per_layer_params_give_the_same_logits(llama):
    """Attention in chunks of 2 positions (an online softmax over 4 chunks), per-layer parameters and
    slots=None all compute what one pass over the cache with stacked layers computes."""
    config, params = llama
    cache = decoder.init_cache(config, slots=2, max_len=8)
    tokens, positions = _i32([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 0, 0, 0]]), _i32([range(7), [0, 1, 2, 3, 8, 8, 8]])
    whole, whole_cache = _forward(params, tokens, positions, cache, _i32([0, 1]), config=config)
    chunked = jax.jit(decoder.forward, static_argnames=("config", "kv_chunk"))
    split, split_cache = chunked(decoder.unstack_layers(params), tokens, positions, cache, None, config=config,
                                 kv_chunk=2)
    np.testing.assert_allclose(np.asarray(split[0]), np.asarray(whole[0]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(split[1, :4]), np.asarray(whole[1, :4]), atol=ATOL, rtol=0)
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(split_cache[name]), np.asarray(whole_cache[name]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="slots=None needs one row per cache slot: 1 rows, 2 slots"):
        decoder.forward(params, tokens[:1], positions[:1], cache, None, config=config)


def test_a_rows_logits_do_not_depend_on_the_other_rows_lengths(llama):
    """A decode step attends over as many chunks as the longest row needs; the chunks a short row cannot
    see leave its logits bit for bit unchanged (batch invariance of greedy and sampled rows)."""
    config, params = llama
    step = jax.jit(decoder.forward, static_argnames=("config", "kv_chunk"))
    cache = decoder.init_cache(config, slots=2, max_len=16)
    prompts, positions = _i32([[5, 9, 2, 33] + [0] * 8, range(1, 13)]), _i32([[0, 1, 2, 3] + [16] * 8, range(12)])
    _, cache = step(params, prompts, positions, cache, None, config=config, kv_chunk=4)
    short_alone, _ = step(params, _i32([[7], [1]]), _i32([[4], [16]]), cache, None, config=config, kv_chunk=4)
    with_long, _ = step(params, _i32([[7], [1]]), _i32([[4], [12]]), cache, None, config=config, kv_chunk=4)
    np.testing.assert_array_equal(np.asarray(with_long[0]), np.asarray(short_alone[0]))


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


def test_config_reads_both_rope_layouts_family_biases_and_window_layers():
    old = decoder.DecoderConfig.from_hf({**LLAMA, "rope_theta": 500000.0,
                                         "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = decoder.DecoderConfig.from_hf({**LLAMA, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "linear",
                                                                      "factor": 2.0}})
    assert old == new and new.rope_theta == 500000.0 and new.rope_scaling == (("factor", 2.0), ("rope_type", "linear"))
    plain = decoder.DecoderConfig.from_hf({**LLAMA, "rope_parameters": {"rope_theta": 10.0, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 10.0
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
        decoder.DecoderConfig.from_hf({**LLAMA, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"rope_scaling type 'llama3' needs \['low_freq_factor'"):
        decoder.DecoderConfig.from_hf({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    qwen2 = decoder.DecoderConfig.from_hf({**LLAMA, "model_type": "qwen2", "attention_bias": False,
                                           "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})
    assert qwen2.attention_bias and not qwen2.attention_out_bias
    assert qwen2.sliding_window == 4 and qwen2.layer_types == ("full_attention", "sliding_attention")
    no_window = decoder.DecoderConfig.from_hf({**LLAMA, "model_type": "qwen2", "sliding_window": 4})
    assert no_window.sliding_window is None  # use_sliding_window is false by default
    mistral = decoder.DecoderConfig.from_hf({**LLAMA, "model_type": "mistral", "attention_bias": True,
                                             "sliding_window": 4})
    assert not mistral.attention_bias and mistral.layer_types == ("sliding_attention",) * 2
    llama = decoder.DecoderConfig.from_hf({**LLAMA, "attention_bias": True, "mlp_bias": True, "sliding_window": 4})
    assert llama.attention_out_bias and llama.mlp_bias and llama.sliding_window is None


def test_sliding_window_sees_only_the_last_window_tokens():
    """One layer with a window of 3: position p attends to p-2..p only, as a full-attention model over those
    three tokens alone (RoPE scores depend on relative positions only).  (With more layers the receptive
    field grows by the window per layer.)"""
    one_layer = {**LLAMA, "model_type": "mistral", "num_hidden_layers": 1}
    window = decoder.DecoderConfig.from_hf({**one_layer, "sliding_window": 3})
    full, params = _model(one_layer)
    tokens = [5, 9, 2, 33, 7, 1]
    logits, _ = _forward(params, _i32([tokens]), _i32([range(6)]), decoder.init_cache(window, slots=1, max_len=8),
                         _i32([0]), config=window)
    last3, _ = _forward(params, _i32([tokens[3:]]), _i32([range(3)]), decoder.init_cache(full, slots=1, max_len=8),
                        _i32([0]), config=full)
    np.testing.assert_allclose(np.asarray(logits[0, 5]), np.asarray(last3[0, 2]), atol=1e-4, rtol=0)
    assert np.abs(np.asarray(logits[0, 5]) - np.asarray(_forward(params, _i32([tokens]), _i32([range(6)]),
           decoder.init_cache(full, slots=1, max_len=8), _i32([0]), config=full)[0][0, 5])).max() > 1e-2


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


# ---------------------------------------------------------------------------------------------------
# Reference checks against transformers (fixtures from scripts/make_decoder_fixtures.py).
# Prefill logits: atol 1e-4, rtol 1e-4 (float32 on both sides; the differences are summation order).
# Greedy ids: token for token.  All prompts of a family run as one batch, right-padded to one prefill
# length (padding positions -1), then decode together: two compiles per family.

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "decoders"
FAMILY_FIXTURES = ("llama", "llama-rope-llama3", "llama-rope-dynamic", "qwen2", "mistral", "gpt2")
PROMPTS = json.loads((FIXTURES / "prompts.json").read_text())
PREFILL_LEN, MAX_LEN = 32, 64


def _reference(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / family / "reference.npz") as z:
        return dict(z)


def _prefill_and_greedy(lm, prompts: list[list[int]], steps: int):
    """(prefill logits [B, PREFILL_LEN, V], greedy ids [B, steps]) for all prompts in one batch."""
    config, params = lm.config, lm.params
    b = len(prompts)
    tokens = np.zeros((b, PREFILL_LEN), np.int32)
    positions = np.full((b, PREFILL_LEN), -1, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = ids
        positions[i, :len(ids)] = np.arange(len(ids))
    slots = _i32(range(b))
    cache = decoder.init_cache(config, slots=b, max_len=MAX_LEN)
    logits, cache = _forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, slots, config=config)
    lengths = np.array([len(ids) for ids in prompts])
    nxt = np.asarray(logits)[np.arange(b), lengths - 1].argmax(-1)
    out = [nxt]
    for step in range(steps - 1):
        step_logits, cache = _forward(params, _i32(nxt[:, None]), _i32((lengths + step)[:, None]), cache, slots,
                                      config=config)
        nxt = np.asarray(step_logits)[:, 0].argmax(-1)
        out.append(nxt)
    return np.asarray(logits), np.stack(out, axis=1)


@pytest.fixture(scope="module", params=FAMILY_FIXTURES)
def family_run(request):
    family = request.param
    lm = LanguageModel.from_name(str(FIXTURES / family)).load()
    ref = _reference(family)
    prompts = [ref[f"ids_{i}"].tolist() for i in range(len(PROMPTS))]
    logits, greedy = _prefill_and_greedy(lm, prompts, steps=16)
    return family, lm, ref, logits, greedy


def test_tokenizer_matches_transformers(family_run):
    family, lm, ref, _, _ = family_run
    for i, prompt in enumerate(PROMPTS):
        assert lm.encode(prompt) == ref[f"ids_{i}"].tolist(), (family, prompt)


def test_prefill_logits_match_transformers(family_run):
    family, _, ref, logits, _ = family_run
    for i in range(len(PROMPTS)):
        expected = ref[f"logits_{i}"]  # [L, V]
        np.testing.assert_allclose(logits[i, :len(expected)], expected, atol=1e-4, rtol=1e-4,
                                   err_msg=f"{family} prompt {i}")


def test_greedy_matches_transformers_token_for_token(family_run):
    family, _, ref, _, greedy = family_run
    for i in range(len(PROMPTS)):
        expected = ref[f"greedy_{i}"]  # <= 16 ids: transformers stops after an EOS
        assert greedy[i, :len(expected)].tolist() == expected.tolist(), (family, i)


# ---------------------------------------------------------------------------------------------------
# HF directories (models/lm.py): loading, special tokens, chat template, refusals.


def _copy(family: str, tmp_path: Path) -> Path:
    directory = tmp_path / family
    shutil.copytree(FIXTURES / family, directory)
    return directory


def _rewrite_weights(directory: Path, change) -> None:
    """Rewrites model.safetensors with `change(tensors)` applied."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_special_tokens_and_generation_config_come_from_the_directory(family_run):
    family, lm, _, _, _ = family_run
    expected_eos = {"gpt2": "<|endoftext|>", "qwen2": "<|im_end|>"}.get(family, "</s>")
    assert lm.eos_token_ids == (lm.tokenizer.token_to_id(expected_eos),)
    assert lm.bos_token_id == (None if family == "qwen2" else lm.tokenizer.token_to_id(
        "<|endoftext|>" if family == "gpt2" else "<s>"))
    assert lm.generation_config["eos_token_id"] == lm.eos_token_ids[0]


def test_chat_template_renders_as_transformers():
    reference = json.loads((FIXTURES / "qwen2" / "reference_chat.json").read_text())
    lm = LanguageModel.from_name(str(FIXTURES / "qwen2")).load()
    assert lm.apply_chat_template(reference["messages"]) == reference["text"]
    assert lm.decode(lm.encode(reference["text"], add_special_tokens=False), skip_special_tokens=False) == \
        reference["text"]


def test_model_spec_resolves_decoder_directories_to_language_models(tmp_path):
    from bulkinfer.models.resolve import model_spec
    from bulkinfer.models.text import TextEmbedder

    spec = model_spec(str(FIXTURES / "llama"), dtype="bfloat16")
    assert isinstance(spec, LanguageModel) and spec.name == "llama" and spec.dtype == "bfloat16"
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(dataclasses.replace(spec, path="/moved"))
    assert isinstance(model_spec(str(FIXTURES.parent / "roberta" / "model")), TextEmbedder)
    with pytest.raises(ValueError, match=r"settings \['max_length'\] do not apply to a decoder LM"):
        model_spec(str(FIXTURES / "llama"), max_length=16)
    directory = _copy("llama", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(CheckpointError, match="model_type 'falcon' is not supported; text encoders: bert, .*; "
                                              "decoder LMs: llama, mistral, qwen2, gpt2"):
        model_spec(str(directory))


def test_bfloat16_parameters_give_float32_logits_near_the_reference():
    lm = LanguageModel.from_name(str(FIXTURES / "llama"), dtype="bfloat16").load()
    assert {leaf.dtype for leaf in jax.tree.leaves(lm.params)} == {jnp.dtype(jnp.bfloat16)}
    ref = _reference("llama")
    ids = ref["ids_2"]
    cache = decoder.init_cache(lm.config, slots=1, max_len=32, dtype=jnp.bfloat16)
    logits, _ = _forward(lm.params, _i32([ids]), _i32([range(len(ids))]), cache, _i32([0]), config=lm.config)
    assert logits.dtype == jnp.float32
    spread = ref["logits_2"].std()
    assert np.abs(np.asarray(logits[0]) - ref["logits_2"]).max() < 0.25 * spread  # bf16: ~3 significant digits


def test_sharded_checkpoint_refusals_name_the_shard(tmp_path):
    directory = _copy("qwen2", tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # the fixture is sharded
    shard = sorted(set(index["weight_map"].values()))[1]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are missing: {shard}"):
        LanguageModel.from_name(str(directory))
    directory = _copy("qwen2", tmp_path / "moved")
    name, first = next(iter(index["weight_map"].items()))
    other = next(f for f in set(index["weight_map"].values()) if f != first)
    index["weight_map"][name] = other
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{other}: lacks tensors that .* puts there: {re.escape(name)}"):
        LanguageModel.from_name(str(directory))


def test_bad_checkpoints_are_refused_naming_the_tensor(tmp_path):
    directory = _copy("llama", tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.self_attn\.v_proj\.weight"):
        LanguageModel.from_name(str(directory))
    directory = _copy("gpt2", tmp_path)
    fc = "transformer.h.0.mlp.c_fc.weight"  # as GPT2LMHeadModel saves it
    _rewrite_weights(directory, lambda t: t.update({fc: t[fc].T.copy()}))
    with pytest.raises(CheckpointError, match=r"wrong shapes transformer\.h\.0\.mlp\.c_fc\.weight: \(128, 32\) \(expected \(32, 128\)\)"):
        LanguageModel.from_name(str(directory))
    directory = _copy("mistral", tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: file is missing"):
        LanguageModel.from_name(str(directory))


def test_eos_ids_follow_generation_config_and_weights_need_safetensors(tmp_path):
    directory = _copy("llama", tmp_path)
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, 2]}))
    lm = LanguageModel.from_name(str(directory)).load()
    assert lm.eos_token_ids == (1, 2) and lm.bos_token_id == 0 and lm.eos_token == "</s>"
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json "
                                              r"\(found pytorch_model.bin: convert them to safetensors\)"):
        LanguageModel.from_name(str(directory))
