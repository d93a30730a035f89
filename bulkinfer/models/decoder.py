"""Decoder-only language models (Llama, Mistral, Qwen2, GPT-2) as pure JAX functions over a slot KV cache.

Nothing here imports Beam or touches files: `DecoderConfig.from_hf` reads an HF config.json dict,
`params_from_hf` turns HF state-dict tensors into the parameter pytree below, and `forward` runs one
prefill or decode step.  The generation loop (runtime/generate.py) is the only code that calls `forward`
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

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")  # HF rope_scaling types computed here

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# The rope_scaling keys each type needs (beyond "rope_type"/"type").
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """A decoder LM's shape and variant; hashable, so it is a static argument of jitted functions.

    model_type: one of FAMILIES; it decides the weight names and the block's layout.
    rms_norm_eps: the epsilon of every norm (RMSNorm; GPT-2's LayerNorm `layer_norm_epsilon`).
    rope_theta: the RoPE base (unused by gpt2).
    rope_scaling: HF's `rope_scaling` / `rope_parameters` dict as sorted (key, value) items, without
      rope_theta; None for plain RoPE.  Types: ROPE_TYPES.
    attention_bias: q/k/v projections have biases.  attention_out_bias: o_proj has a bias.
    mlp_bias: the MLP's projections have biases.
    sliding_window: the attention window in tokens (a key at position j is visible from position p when
      p - window < j <= p) on the layers whose `layer_types` entry is "sliding_attention"; None: none.
    layer_types: per layer "full_attention" or "sliding_attention" (empty: all full).
    attn_scale: the factor on q.k scores (1/sqrt(head_dim) for every family here unless GPT-2's
      scale_attn_weights is false).  attn_scale_by_layer: GPT-2's scale_attn_by_inverse_layer_idx.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_scale: float | None = None
    attn_scale_by_layer: bool = False

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type {self.model_type!r} is not a decoder family here; supported: "
                             f"{', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(_ACTIVATIONS)}")
        if self.is_gpt2 and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("gpt2 has no grouped-query attention: num_key_value_heads must equal "
                             "num_attention_heads")
        if self.rope_scaling is not None:
            _rope_type(self.rope_scaling)  # refuses an unknown type by name
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ValueError(f"layer_types {bad} are not supported; expected full_attention or "
                                 "sliding_attention")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types names sliding_attention layers but sliding_window is None")

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def gated_mlp(self) -> bool:
        return not self.is_gpt2

    @property
    def rope(self) -> bool:
        return not self.is_gpt2

    @classmethod
    def from_hf(cls, config: Mapping) -> DecoderConfig:
        """The config of an HF `config.json` dict; its `model_type` picks the family.

        Defaults are those of the transformers config classes.  Both rope layouts are read: the older
        top-level `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`.  Raises ValueError
        naming the field for a model_type outside FAMILIES, a missing field, or a variant not computed here
        (an unknown rope type, partial rotary embeddings, GPT-2 cross-attention).
        """
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not a decoder family here; supported: {', '.join(FAMILIES)}")
        try:
            if family == "gpt2":
                return _gpt2_config(config)
            return _llama_config(family, config)
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r} that a {family} decoder needs") from None


def _gpt2_config(c: Mapping) -> DecoderConfig:
    if c.get("add_cross_attention"):
        raise ValueError("gpt2 with add_cross_attention is an encoder-decoder; only decoder-only gpt2 is supported")
    d, h = c["n_embd"], c["n_head"]
    if d % h:
        raise ValueError(f"n_embd {d} is not divisible by n_head {h}")
    return DecoderConfig(
        model_type="gpt2", vocab_size=c["vocab_size"], hidden_size=d, intermediate_size=c.get("n_inner") or 4 * d,
        num_hidden_layers=c["n_layer"], num_attention_heads=h, num_key_value_heads=h, head_dim=d // h,
        max_position_embeddings=c["n_positions"], rms_norm_eps=c.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=c.get("tie_word_embeddings", True), attention_bias=True, attention_out_bias=True,
        mlp_bias=True, hidden_act=c.get("activation_function", "gelu_new"),
        attn_scale=None if c.get("scale_attn_weights", True) else 1.0,
        attn_scale_by_layer=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
    )


def _rope_settings(c: Mapping) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling items or None) from either layout of config.json."""
    params = dict(c.get("rope_parameters") or {})
    params.update(c.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
    factor = params.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor") or 1.0
    if factor != 1.0:
        raise ValueError(f"partial_rotary_factor {factor} is not supported; only full rotary embeddings (1.0)")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    if params["rope_type"] == "default" and len(params) == 1:
        return float(theta), None
    # Hashable: DecoderConfig is a static argument (JSON lists, e.g. mrope_section, become tuples).
    return float(theta), tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def _llama_config(family: str, c: Mapping) -> DecoderConfig:
    d, h = c["hidden_size"], c["num_attention_heads"]
    theta, scaling = _rope_settings(c)
    kv = c.get("num_key_value_heads") or h
    head_dim = c.get("head_dim") or d // h
    # As transformers builds them: qwen2 always has q/k/v biases (never o_proj's), mistral none, llama
    # follows attention_bias (q/k/v and o_proj) and mlp_bias.
    bias = {"llama": bool(c.get("attention_bias", False)), "mistral": False, "qwen2": True}[family]
    n = c["num_hidden_layers"]
    window = c.get("sliding_window")
    layer_types = tuple(c.get("layer_types") or ())
    if family == "llama":
        window, layer_types = None, ()
    elif family == "mistral":
        layer_types = ("sliding_attention",) * n if window is not None else ()
    else:  # qwen2: the window applies only when use_sliding_window, on layers >= max_window_layers
        if not c.get("use_sliding_window", False):
            window = None
        if not layer_types:
            first = c.get("max_window_layers", 28)
            layer_types = tuple("sliding_attention" if window is not None and i >= first else "full_attention"
                                for i in range(n))
        if "sliding_attention" not in layer_types:
            window, layer_types = None, ()
    return DecoderConfig(
        model_type=family, vocab_size=c["vocab_size"], hidden_size=d, intermediate_size=c["intermediate_size"],
        num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bias, attention_out_bias=bias and family == "llama",
        mlp_bias=bool(c.get("mlp_bias", False)) and family == "llama", hidden_act=c.get("hidden_act", "silu"),
        sliding_window=window, layer_types=layer_types,
    )


def _rope_type(scaling: tuple) -> str:
    params = dict(scaling)
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    missing = [k for k in _ROPE_KEYS[kind] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling type {kind!r} needs {missing}; config.json gives {sorted(params)}")
    return kind


# ---------------------------------------------------------------------------------------------------
# Weights: HF state-dict names -> the parameter pytree.


def _hf_layout(config: DecoderConfig) -> tuple[dict[str, tuple[str, tuple[int, ...], bool]],
                                                dict[str, tuple[str, tuple[int, ...], bool]]]:
    """(global tensors, per-layer tensors): our name -> (HF name, HF shape, transpose).  Per-layer HF names
    hold "{i}" for the layer index."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qd = config.num_attention_heads * config.head_dim
    kd = config.num_key_value_heads * config.head_dim
    if config.is_gpt2:
        top = {
            "embed": ("wte.weight", (v, d), False),
            "pos_embed": ("wpe.weight", (config.max_position_embeddings, d), False),
            "final_norm.scale": ("ln_f.weight", (d,), False),
            "final_norm.bias": ("ln_f.bias", (d,), False),
        }
        layer = {  # Conv1D weights are [in, out] already; c_attn is split into q, k, v at load
            "attn_norm.scale": ("h.{i}.ln_1.weight", (d,), False),
            "attn_norm.bias": ("h.{i}.ln_1.bias", (d,), False),
            "c_attn_w": ("h.{i}.attn.c_attn.weight", (d, 3 * d), False),
            "c_attn_b": ("h.{i}.attn.c_attn.bias", (3 * d,), False),
            "o_w": ("h.{i}.attn.c_proj.weight", (d, d), False),
            "o_b": ("h.{i}.attn.c_proj.bias", (d,), False),
            "mlp_norm.scale": ("h.{i}.ln_2.weight", (d,), False),
            "mlp_norm.bias": ("h.{i}.ln_2.bias", (d,), False),
            "up_w": ("h.{i}.mlp.c_fc.weight", (d, f), False),
            "up_b": ("h.{i}.mlp.c_fc.bias", (f,), False),
            "down_w": ("h.{i}.mlp.c_proj.weight", (f, d), False),
            "down_b": ("h.{i}.mlp.c_proj.bias", (d,), False),
        }
    else:  # torch Linear weights are [out, in]: transposed to [in, out]
        top = {
            "embed": ("model.embed_tokens.weight", (v, d), False),
            "final_norm.scale": ("model.norm.weight", (d,), False),
        }
        p = "model.layers.{i}."
        layer = {
            "attn_norm.scale": (p + "input_layernorm.weight", (d,), False),
            "mlp_norm.scale": (p + "post_attention_layernorm.weight", (d,), False),
            "q_w": (p + "self_attn.q_proj.weight", (qd, d), True),
            "k_w": (p + "self_attn.k_proj.weight", (kd, d), True),
            "v_w": (p + "self_attn.v_proj.weight", (kd, d), True),
            "o_w": (p + "self_attn.o_proj.weight", (d, qd), True),
            "gate_w": (p + "mlp.gate_proj.weight", (f, d), True),
            "up_w": (p + "mlp.up_proj.weight", (f, d), True),
            "down_w": (p + "mlp.down_proj.weight", (d, f), True),
        }
        if config.attention_bias:
            layer |= {"q_b": (p + "self_attn.q_proj.bias", (qd,), False),
                      "k_b": (p + "self_attn.k_proj.bias", (kd,), False),
                      "v_b": (p + "self_attn.v_proj.bias", (kd,), False)}
        if config.attention_out_bias:
            layer["o_b"] = (p + "self_attn.o_proj.bias", (d,), False)
        if config.mlp_bias:
            layer |= {"gate_b": (p + "mlp.gate_proj.bias", (f,), False),
                      "up_b": (p + "mlp.up_proj.bias", (f,), False),
                      "down_b": (p + "mlp.down_proj.bias", (d,), False)}
    if not config.tie_word_embeddings:
        top["lm_head"] = ("lm_head.weight", (v, d), True)
    return top, layer


def _strip_prefix(config: DecoderConfig, names) -> dict[str, str]:
    """HF name as stored -> canonical name.  GPT-2 checkpoints store "transformer.h.0..." (GPT2LMHeadModel)
    or "h.0..." (GPT2Model)."""
    if not config.is_gpt2:
        return {n: n for n in names}
    return {n: n.removeprefix("transformer.") for n in names}


def _ignored(config: DecoderConfig, name: str) -> bool:
    """Stored names that are not weights (buffers) or duplicates of tied weights."""
    if config.is_gpt2 and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")):
        return True  # the causal-mask buffers of older GPT-2 checkpoints
    if name.endswith("rotary_emb.inv_freq"):
        return True  # a buffer some Llama checkpoints store
    return config.tie_word_embeddings and name == "lm_head.weight"


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name this config needs -> its shape (GPT-2 names without "transformer.")."""
    top, layer = _hf_layout(config)
    shapes = {hf: shape for hf, shape, _ in top.values()}
    for i in range(config.num_hidden_layers):
        shapes |= {hf.format(i=i): shape for hf, shape, _ in layer.values()}
    return shapes


def check_hf_shapes(config: DecoderConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises ValueError naming every missing or unexpected tensor and every tensor of the wrong shape
    (as the checkpoint names them).

    shapes: stored HF name -> shape (as in a safetensors header), without reading any data."""
    canonical = _strip_prefix(config, shapes)
    stored = {canonical[n]: n for n in shapes if not _ignored(config, canonical[n])}
    found = {c: tuple(shapes[n]) for c, n in stored.items()}
    prefix = "transformer." if any(n.startswith("transformer.") for n in shapes) else ""
    want = expected_shapes(config)
    missing = sorted(prefix + n for n in set(want) - set(found))
    unexpected = sorted(stored[n] for n in set(found) - set(want))
    wrong = [f"{stored[n]}: {found[n]} (expected {want[n]})" for n in sorted(set(want) & set(found))
             if found[n] != want[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_few(wrong)}")
    if problems:
        raise ValueError(f"the checkpoint does not fit its {config.model_type} config.json "
                         f"({config.num_hidden_layers} layers, hidden_size {config.hidden_size}): "
                         + "; ".join(problems))


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def params_from_hf(config: DecoderConfig, tensors: Mapping[str, np.ndarray], dtype=np.float32) -> Params:
    """HF state-dict tensors ("model.layers.0.self_attn.q_proj.weight", GPT-2's "h.0.attn.c_attn.weight"
    with or without "transformer.") -> the parameter pytree in the module docstring, as numpy arrays of
    `dtype` (layers stacked on a leading axis; torch Linear weights transposed to [in, out]).

    Raises ValueError naming the missing and unexpected tensors and those of the wrong shape, before any copy.
    """
    check_hf_shapes(config, {n: np.shape(t) for n, t in tensors.items()})
    canonical = {c: n for n, c in _strip_prefix(config, tensors).items()}

    def get(hf_name: str, transpose: bool) -> np.ndarray:
        array = np.asarray(tensors[canonical[hf_name]])
        return (array.T if transpose else array).astype(dtype)

    top, layer = _hf_layout(config)
    params: Params = {"layers": {}}
    for ours, (hf, _, transpose) in top.items():
        _put(params, ours, get(hf, transpose))
    for ours, (hf, _, transpose) in layer.items():
        stacked = np.stack([get(hf.format(i=i), transpose) for i in range(config.num_hidden_layers)])
        _put(params["layers"], ours, stacked)
    if config.is_gpt2:  # the fused c_attn [N, D, 3D] -> q, k, v [N, D, D]
        layers = params["layers"]
        layers["q_w"], layers["k_w"], layers["v_w"] = np.split(layers.pop("c_attn_w"), 3, axis=-1)
        layers["q_b"], layers["k_b"], layers["v_b"] = np.split(layers.pop("c_attn_b"), 3, axis=-1)
    return params


def _put(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


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
    kind = _rope_type(config.rope_scaling)
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
    if config.rope_scaling is not None and _rope_type(config.rope_scaling) == "dynamic":
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
    act = _ACTIVATIONS[config.hidden_act]
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


def random_hf_tensors(config: DecoderConfig, *, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Random HF-named float32 tensors for `config` (norm scales 1, biases and weights N(0, std)): tiny
    models for tests and benchmarks, without a checkpoint.  `params_from_hf(config, ...)` loads them."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        is_norm = any(k in name for k in ("layernorm", "norm.", "ln_"))
        if is_norm and name.endswith("weight"):
            tensors[name] = (1.0 + rng.normal(0.0, std, shape)).astype(np.float32)
        else:
            tensors[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return tensors
