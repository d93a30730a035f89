"""Decoder-only language models (Llama, Mistral, Qwen2, GPT-2) as pure JAX functions over a slot KV cache.

Nothing here imports Beam or touches files: `DecoderConfig.from_hf` reads an HF config.json dict and
`params_from_hf` turns HF state-dict tensors into the parameter pytree below (both in
`bulkinfer.models.decoder_config`, re-exported here), and `forward` runs one prefill or decode step.  The generation loop (runtime/generate.py) is the only code that calls `forward`
in a loop.

The families share one pre-norm decoder and differ only in what `DecoderConfig` records:
- llama / mistral / qwen2: RMSNorm, rotary positions (RoPE, with HF's `rope_scaling` types default,
  linear, dynamic and llama3), SwiGLU MLP, grouped-query attention, optional q/k/v biases (qwen2;
  llama's `attention_bias` also biases o_proj; mistral has none), optional sliding-window attention (mistral's
  `sliding_window`, qwen2's `use_sliding_window` on layers >= `max_window_layers`).
- gpt2: learned absolute positions, LayerNorm with bias, a plain MLP (gelu_new), biases everywhere.

Parameter layout (layers stacked on a leading axis, which `forward` runs as one `lax.scan`; `unstack_layers`
turns them into a tuple of per-layer dicts, which `forward` unrolls, faster on XLA:CPU; D = hidden size,
F = intermediate size, N = layers, H = attention heads, K = key/value heads, Dh = head_dim, V = vocab):

    embed [V, D]; pos_embed [P, D] (gpt2 only); final_norm {scale [D], bias [D] (gpt2 only)};
    lm_head [D, V] (absent when tie_word_embeddings: logits use embed.T)
    layers: attn_norm {scale [N, D], bias [N, D] (gpt2)}, mlp_norm {same},
            q_w [N, D, H*Dh], k_w [N, D, K*Dh], v_w [N, D, K*Dh], o_w [N, H*Dh, D],
            q_b [N, H*Dh], k_b [N, K*Dh], v_b [N, K*Dh] (attention_bias), o_b [N, D] (attention_out_bias),
            up_w [N, D, F], down_w [N, F, D], gate_w [N, D, F] (gated MLPs), up_b [N, F], down_b [N, D] (mlp_bias)

The KV cache is {"k": [N, S, K, Dh, M], "v": [N, S, K, M, Dh]} for S slots (sequences in flight) of M
positions each (`init_cache`).

    >>> config = DecoderConfig.from_hf(json.load(open("config.json")))
    >>> params = params_from_hf(config, safetensors_file.load_safetensors("model.safetensors"))
    >>> cache = init_cache(config, slots=4, max_len=256)
    >>> params = unstack_layers(params)
    >>> step = jax.jit(forward, static_argnames="config", donate_argnames="cache")
    >>> logits, cache = step(params, tokens, positions, cache, slots, config=config)   # tokens [B, T]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bulkinfer.models.decoder_config import (  # noqa: F401 -- the config half, re-exported: decoder.X keeps working
    ACTIVATIONS,
    FAMILIES,
    ROPE_TYPES,
    DecoderConfig,
    Params,
    check_hf_shapes,
    expected_shapes,
    params_from_hf,
    random_hf_tensors,
    rope_type,
)

# ---------------------------------------------------------------------------------------------------
# The forward step.


def init_cache(config: DecoderConfig, *, slots: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache of zeros of `dtype`: {"k": [layers, slots, kv_heads, head_dim, max_len],
    "v": [layers, slots, kv_heads, max_len, head_dim]}.

    Keys put positions last and values put them next to last, so that both attention products of a decode
    step (q.k over head_dim, p.v over positions) read the cache in its stored order, without a transpose.

    Raises ValueError when max_len exceeds GPT-2's learned position table (max_position_embeddings)."""
    if slots < 1 or max_len < 1:
        raise ValueError(f"slots and max_len must be >= 1, got slots={slots}, max_len={max_len}")
    if config.is_gpt2 and max_len > config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds gpt2's {config.max_position_embeddings} learned positions; "
                         f"use max_len <= {config.max_position_embeddings}")
    n, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    return {"k": jnp.zeros((n, slots, kv, hd, max_len), dtype), "v": jnp.zeros((n, slots, kv, max_len, hd), dtype)}


def unstack_layers(params: Params) -> Params:
    """The same parameters with "layers" as a tuple of per-layer dicts instead of arrays stacked on a
    leading axis.  `forward` accepts both; with per-layer arrays each layer's matrix multiplications read
    their weights in place, where slicing a stacked array copies every layer's weights at every call
    (on XLA:CPU a slice does not fuse into the matmul that reads it).  Use it for serving."""
    layers = params["layers"]
    if isinstance(layers, list | tuple):
        return params
    n = len(jax.tree.leaves(layers)[0])
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))}


def _inv_freq(config: DecoderConfig) -> np.ndarray:
    """RoPE inverse frequencies [Dh/2] float32 before dynamic scaling (HF `ROPE_INIT_FUNCTIONS`)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    if config.rope_scaling is None:
        return inv.astype(np.float32)
    s = dict(config.rope_scaling)
    kind = rope_type(config.rope_scaling)
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":  # HF _compute_llama3_parameters
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _rope_angles(config: DecoderConfig, positions: jax.Array, valid: jax.Array) -> jax.Array:
    """Rotation angles [B, T, Dh/2] float32 for positions [B, T]."""
    inv = jnp.asarray(_inv_freq(config))  # [Dh/2]
    pos = positions.astype(jnp.float32)
    if config.rope_scaling is not None and rope_type(config.rope_scaling) == "dynamic":
        # HF dynamic NTK: the base grows with the sequence length seen by the call (max position + 1).
        # Here the length is each row's own, so a row does not depend on the other rows of its batch; for
        # one sequence it equals HF's (prefill: the prompt length; decode: position + 1).
        s = dict(config.rope_scaling)
        dim, mpe, factor = config.head_dim, config.max_position_embeddings, s["factor"]
        seq_len = jnp.max(jnp.where(valid, positions, -1), axis=1) + 1  # [B]
        seq_len = jnp.maximum(seq_len, mpe).astype(jnp.float32)
        base = config.rope_theta * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))  # [B]
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim  # [Dh/2]
        inv = 1.0 / (base[:, None] ** exponents[None, :])  # [B, Dh/2]
        return pos[..., None] * inv[:, None, :]
    return pos[..., None] * inv  # [B, T, Dh/2]


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate_half RoPE on x [B, T, heads, Dh]; cos, sin [B, T, 1, Dh/2] float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _norm(x: jax.Array, p: Mapping, config: DecoderConfig) -> jax.Array:
    """RMSNorm (llama family) or LayerNorm with bias (gpt2), computed in float32 as HF does."""
    h = x.astype(jnp.float32)
    if config.is_gpt2:
        h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + config.rms_norm_eps)
        return (h * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
    h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + config.rms_norm_eps)
    return p["scale"] * h.astype(x.dtype)


def _linear(x, p, name):
    y = x @ p[name + "_w"]
    return y + p[name + "_b"] if name + "_b" in p else y


KV_CHUNK = 128  # cache positions attended per iteration of the attention loop


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Mapping[str, jax.Array],
            slots: jax.Array | None, *, config: DecoderConfig, kv_len: int | None = None,
            kv_chunk: int = KV_CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One prefill (T > 1) or decode (T == 1) step over a slot KV cache.

    tokens, positions: [B, T] int32; slots: [B] int32, the cache row (sequence) each batch row uses, or
    None when row b uses cache row b (B == slots of the cache: a decode step over every slot, which then
    reads the cache in place instead of gathering rows).
    Row b's token t sits at position positions[b, t] of sequence slots[b]; its k/v are written at that
    position of the slot's cache row.  A position outside [0, max_len) marks padding: nothing is written
    and its logits are garbage, to be ignored.  Each query attends to its slot's cache entries at positions
    <= its own (and inside the sliding window, if any), so a caller fills a sequence's positions from 0
    without gaps; stale entries of a slot's previous sequence at later positions are never seen.  Rows with
    real tokens must use distinct slots.

    Attention runs over the cache in chunks of `kv_chunk` positions with an online softmax (Milakov and
    Gimelshein 2018, "Online normalizer calculation for softmax"), in a loop whose trip count is decided
    at run time by the largest position in the call: a step costs what its rows' lengths need, not
    max_len, and one compile serves every length.  A chunk that a query cannot see leaves its numbers
    bit for bit unchanged (its maximum stays, its weights are exactly 0), so a row's logits do not depend
    on the other rows' lengths.

    params: `params_from_hf`'s pytree, its "layers" stacked (one `lax.scan`: quick to compile) or per layer
      (`unstack_layers`: unrolled, slower to compile, faster to run; use it for generation).
    Returns (logits [B, T, vocab] float32, the new cache).  Pure: jit with `config` static and the cache
    donated; the shapes of tokens and the cache are the compile keys.

    kv_len: (static) attend over cache positions [0, kv_len) only, instead of all max_len.  Every real
      position in the call must be < kv_len (a query at a later position would not see its own key;
      nothing checks this inside jit).  Writes still reach every position < max_len.
      Raises ValueError unless 1 <= kv_len <= max_len.
    kv_chunk: (static) positions per attention iteration; max_len is cut into chunks of this size (the
      last one shorter when it does not divide).
    """
    b, t = tokens.shape
    n_layers, n_slots = cache["k"].shape[:2]
    max_len = cache["k"].shape[-1]
    dtype = params["embed"].dtype
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = h // kv
    if slots is None and b != n_slots:
        raise ValueError(f"slots=None needs one row per cache slot: {b} rows, {n_slots} slots")
    valid = (positions >= 0) & (positions < max_len)  # [B, T]
    safe_pos = jnp.where(valid, positions, 0)
    write_pos = jnp.where(valid, positions, max_len)  # out of range: dropped by the scatter below
    rows = jnp.arange(b, dtype=jnp.int32) if slots is None else slots  # [B]

    x = params["embed"][tokens]  # [B, T, D]
    if config.is_gpt2:
        x = x + params["pos_embed"][safe_pos]
    if config.rope:
        angles = _rope_angles(config, safe_pos, valid)[:, :, None, :]  # [B, T, 1, Dh/2]
        cos, sin = jnp.cos(angles), jnp.sin(angles)

    if kv_len is None:
        kv_len = max_len
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"kv_len {kv_len} must be in [1, max_len={max_len}]")
    chunk = min(kv_chunk, kv_len)
    # Chunks that any query in the call can see: those up to its largest position (dynamic).
    n_chunks = jnp.minimum(jnp.max(safe_pos) // chunk + 1, -(-kv_len // chunk))
    types = config.layer_types or ("full_attention",) * config.num_hidden_layers
    scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(hd)
    act = ACTIVATIONS[config.hidden_act]
    layers = params["layers"]

    def attend(q, k_all, v_all, i, is_sliding):
        """q [B, T, K, G, Dh] over layer i's cache -> context [B, T, K, G, Dh].  i, is_sliding: Python
        values (unrolled layers) or traced scalars (the scan over stacked layers)."""
        layer_scale = scale / (jnp.asarray(i) + 1).astype(jnp.float32) if config.attn_scale_by_layer else scale

        def body(c, carry):
            m, total, acc = carry  # m, total [B, K, G, T] float32; acc [B, K, G, T, Dh] float32
            start = jnp.minimum(c * chunk, max_len - chunk)  # the last chunk may overlap the one before
            keys = jax.lax.dynamic_slice(k_all, (i, 0, 0, 0, start), (1, n_slots, kv, hd, chunk))[0]
            values = jax.lax.dynamic_slice(v_all, (i, 0, 0, start, 0), (1, n_slots, kv, chunk, hd))[0]
            if slots is not None:
                keys, values = keys[slots], values[slots]  # [B, K, Dh, C], [B, K, C, Dh]
            scores = jnp.einsum("btkgd,bkdc->bkgtc", q, keys.astype(dtype),
                                preferred_element_type=jnp.float32) * layer_scale  # [B, K, G, T, C]
            key_pos = start + jnp.arange(chunk)  # [C]
            visible = (key_pos[None, None, :] <= safe_pos[:, :, None]) & (key_pos >= c * chunk)  # [B, T, C]
            if config.sliding_window is not None:
                in_window = key_pos[None, None, :] > safe_pos[:, :, None] - config.sliding_window
                visible &= in_window | jnp.logical_not(is_sliding)  # is_sliding: a bool or a traced one
            scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(-1))  # [B, K, G, T]
            finite = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a query that has seen nothing yet
            alpha = jnp.exp(m - finite)  # 0 where m is -inf; exactly 1 where the chunk adds nothing
            p = jnp.exp(scores - finite[..., None])  # [B, K, G, T, C]; 0 where not visible
            total = total * alpha + p.sum(-1)
            pv = jnp.einsum("bkgtc,bkcd->bkgtd", p.astype(dtype), values.astype(dtype),
                            preferred_element_type=jnp.float32)
            return m_new, total, acc * alpha[..., None] + pv

        init = (jnp.full((b, kv, groups, t), -jnp.inf, jnp.float32), jnp.zeros((b, kv, groups, t), jnp.float32),
                jnp.zeros((b, kv, groups, t, hd), jnp.float32))
        _, total, acc = jax.lax.fori_loop(0, n_chunks, body, init)
        ctx = acc / total[..., None]  # [B, K, G, T, Dh]
        return ctx.transpose(0, 3, 1, 2, 4).astype(dtype)  # [B, T, K, G, Dh]

    def layer(x, k_all, v_all, p, i, is_sliding):
        y = _norm(x, p["attn_norm"], config)
        q = _linear(y, p, "q").reshape(b, t, h, hd)  # [B, T, H, Dh]
        k = _linear(y, p, "k").reshape(b, t, kv, hd)  # [B, T, K, Dh]
        v = _linear(y, p, "v").reshape(b, t, kv, hd)
        if config.rope:
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        # Write this call's k/v into the cache (k: [.., K, Dh, M], v: [.., K, M, Dh]), then attend.
        at = (i, rows[:, None, None], jnp.arange(kv)[None, None, :])
        k_all = k_all.at[(*at, slice(None), write_pos[:, :, None])].set(k.astype(k_all.dtype), mode="drop")
        v_all = v_all.at[(*at, write_pos[:, :, None])].set(v.astype(v_all.dtype), mode="drop")
        ctx = attend(q.reshape(b, t, kv, groups, hd), k_all, v_all, i, is_sliding).reshape(b, t, h * hd)
        x = x + _linear(ctx, p, "o")
        y = _norm(x, p["mlp_norm"], config)
        if config.gated_mlp:
            y = act(_linear(y, p, "gate")) * _linear(y, p, "up")  # [B, T, F]
        else:
            y = act(_linear(y, p, "up"))
        return x + _linear(y, p, "down"), k_all, v_all

    sliding = [kind == "sliding_attention" for kind in types]
    k_all, v_all = cache["k"], cache["v"]
    if isinstance(layers, list | tuple):  # unrolled: each matmul reads its layer's weights in place
        for i in range(n_layers):
            x, k_all, v_all = layer(x, k_all, v_all, layers[i], i, sliding[i])
    else:  # one scan over the stacked layers: compiles one layer body, but slices (copies) each layer's weights
        def scan_body(carry, xs):
            return layer(*carry, *xs), None

        xs = (layers, jnp.arange(n_layers), jnp.asarray(sliding))
        (x, k_all, v_all), _ = jax.lax.scan(scan_body, (x, k_all, v_all), xs)
    x = _norm(x, params["final_norm"], config)
    head = params["lm_head"] if "lm_head" in params else params["embed"].T  # [D, V]
    logits = jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)  # [B, T, V]
    return logits.astype(jnp.float32), {"k": k_all, "v": v_all}
