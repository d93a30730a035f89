"""Decoder configurations and parameters from HF checkpoints (Llama, Mistral, Qwen2, GPT-2).

`DecoderConfig.from_hf` reads an HF config.json dict; `params_from_hf` checks HF state-dict names and shapes
loudly and builds the parameter pytree that `bulkinfer.models.decoder.forward` runs (its layout is in that
module's docstring); `random_hf_tensors` makes tiny random checkpoints for tests.  Nothing here imports Beam
or touches files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Params = dict[str, Any]

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")  # HF rope_scaling types computed here

ACTIVATIONS = {
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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.is_gpt2 and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("gpt2 has no grouped-query attention: num_key_value_heads must equal "
                             "num_attention_heads")
        if self.rope_scaling is not None:
            rope_type(self.rope_scaling)  # refuses an unknown type by name
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


def rope_type(scaling: tuple) -> str:
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
