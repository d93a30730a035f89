"""BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) as pure JAX functions over a parameter pytree.

Nothing here imports Beam or touches files; `checkpoint.py` turns an HF directory into the
`BertConfig` and parameter pytree used here.  The families share one post-LayerNorm encoder and
differ only in what `BertConfig` records: RoBERTa-style position ids (`padding_idx`), the absence of
token-type embeddings (DistilBERT, `type_vocab_size=0`) and the names of their weights and config keys.

Parameter layout (all float arrays, transformer layers stacked on a leading axis so the encoder is
one `lax.scan`; D = hidden size, F = intermediate size, N = number of layers):

    embeddings: word [V, D], position [P, D], token_type [T, D] (absent when T = 0), ln_scale [D], ln_bias [D]
    layers:     qkv_w [N, D, 3D], qkv_b [N, 3D], out_w [N, D, D], out_b [N, D],
                ln1_scale [N, D], ln1_bias [N, D], ffn_in_w [N, D, F], ffn_in_b [N, F],
                ffn_out_w [N, F, D], ffn_out_b [N, D], ln2_scale [N, D], ln2_bias [N, D]
    dense:      (optional) a list of sentence-transformers Dense layers after pooling: w [In, Out], b [Out]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# Activations of sentence-transformers Dense layers (float32, after pooling).
DENSE_ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "sigmoid": jax.nn.sigmoid,
}

# model_type in config.json -> the prefix of its weights inside a task model (BertForX, RobertaForX, ...).
FAMILIES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "distilbert": "distilbert."}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """A BERT-family encoder's shape and variant.

    family: the config.json model_type (`FAMILIES`); it decides the weight names.
    type_vocab_size: rows of the token-type table; 0 for DistilBERT, which has none.
    padding_idx: None for absolute positions 0..L-1 (BERT, DistilBERT).  An int for RoBERTa-style
      positions (HF `create_position_ids_from_input_ids`): real tokens count up from padding_idx + 1,
      tokens equal to padding_idx sit at padding_idx.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    family: str = "bert"
    padding_idx: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model_type {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}"
            )
        if self.max_tokens < 2:
            raise ValueError(
                f"max_position_embeddings {self.max_position} leaves {self.max_tokens} positions after"
                f" padding_idx {self.padding_idx}; need at least 2"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf(cls, cfg: dict) -> BertConfig:
        """Builds the config from an HF `config.json` (a dict); its `model_type` picks the family.

        Defaults are those of the transformers config classes.  Raises ValueError for a model_type
        outside `FAMILIES`, a missing field, or a variant this encoder does not compute
        (position_embedding_type other than "absolute").
        """
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {cfg['position_embedding_type']!r} is not supported; only \"absolute\""
            )
        padding_idx = None
        if family in ("roberta", "xlm-roberta"):
            padding_idx = cfg.get("pad_token_id", 1)  # transformers' RobertaConfig default
            if not isinstance(padding_idx, int) or padding_idx < 0:
                raise ValueError(f"pad_token_id {padding_idx!r} is not a token id; {family} positions need it")
        try:
            if family == "distilbert":
                return cls(
                    vocab_size=cfg["vocab_size"],
                    hidden_size=cfg["dim"],
                    num_layers=cfg["n_layers"],
                    num_heads=cfg["n_heads"],
                    intermediate_size=cfg["hidden_dim"],
                    max_position=cfg["max_position_embeddings"],
                    type_vocab_size=0,
                    layer_norm_eps=1e-12,  # fixed in transformers' DistilBERT
                    hidden_act=cfg.get("activation", "gelu"),
                    family=family,
                )
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"],
                max_position=cfg["max_position_embeddings"],
                type_vocab_size=cfg.get("type_vocab_size", 2),
                layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                hidden_act=cfg.get("hidden_act", "gelu"),
                family=family,
                padding_idx=padding_idx,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r} that a {family} encoder needs") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows (RoBERTa reserves padding_idx + 1 rows)."""
        return self.max_position - (0 if self.padding_idx is None else self.padding_idx + 1)


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _positions(table: jax.Array, input_ids: jax.Array, mask: jax.Array, config: BertConfig) -> jax.Array:
    """Position embeddings [B, L, D] (or [1, L, D]) for token ids [B, L]."""
    length = input_ids.shape[1]
    if config.padding_idx is None:
        return table[:length][None]  # [1, L, D]: positions 0..L-1
    # RoBERTa, as HF's create_position_ids_from_input_ids: padding_idx + cumulative count of real tokens;
    # a token equal to padding_idx stays at padding_idx.  The mask also excludes the engine's padding.
    real = ((input_ids != config.padding_idx) & (mask > 0)).astype(jnp.int32)  # [B, L]
    return table[jnp.cumsum(real, axis=1) * real + config.padding_idx]  # [B, L, D]


def encode_tokens(params: Params, input_ids: jax.Array, mask: jax.Array, *, config: BertConfig) -> jax.Array:
    """Token states of the encoder.

    input_ids, mask: [B, L] int32 (mask 1 for real tokens, 0 for padding).  Returns [B, L, D].
    """
    emb = params["embeddings"]
    x = _embed(emb, emb["word"][input_ids] + _positions(emb["position"], input_ids, mask, config), config)  # [B, L, D]
    bias = _attention_bias(mask, x.dtype)
    x, _ = jax.lax.scan(functools.partial(_layer, attend=lambda qkv: _attend(qkv, bias, config), config=config),
                        x, params["layers"])
    return x


def encode_packed(params: Params, input_ids: jax.Array, positions: jax.Array, row_ids: jax.Array,
                  token_index: jax.Array, mask: jax.Array, *, config: BertConfig) -> jax.Array:
    """Token states of the encoder over packed rows (`Engine(packed=True)`): the same values as
    `encode_tokens`, with the token-wise layers (embeddings, projections, feed-forward, LayerNorms)
    computed on the real tokens alone.  Only attention uses the padded layout, gathered per layer.

    input_ids: [T] int32, the rows' tokens end to end; positions, row_ids: [T] int32, each token's
    position in its row and its row (B, out of range, after the last real token); token_index: [B, L]
    int32, where row b's token l is in [T] (T, out of range, on padding); mask: [B, L] int32.  Both
    directions are gathers (XLA's scatter is a slow loop on the CPU): [T] -> [B, L] by token_index,
    [B, L] -> [T] by slot = row_ids * L + positions.  Returns [B, L, D] (zeros on padding).
    The method ("removing padding", as in NVIDIA's Effective Transformer and ByteTransformer) computes
    what the padded encoder does on real tokens, so outputs agree with it to float32 rounding.
    """
    emb = params["embeddings"]
    length = token_index.shape[1]
    slot = row_ids * length + positions  # [T]: each token's place in the flattened [B * L] layout

    def unpad(values):  # [B, L, C] -> [T, C]; tokens past the last row get zeros
        return jnp.take(values.reshape(-1, values.shape[-1]), slot, axis=0, mode="fill", fill_value=0)

    if config.padding_idx is None:
        position = emb["position"][positions]  # [T, D]
    else:  # RoBERTa positions count real tokens in the row: computed in the padded layout
        padded_ids = jnp.take(input_ids, token_index, axis=0, mode="fill", fill_value=0)  # [B, L]
        position = unpad(_positions(emb["position"], padded_ids, mask, config))  # [T, D]
    x = _embed(emb, emb["word"][input_ids] + position, config)  # [T, D]
    bias = _attention_bias(mask, x.dtype)

    def attend(qkv):  # [T, 3D] -> [T, D]
        padded = jnp.take(qkv, token_index, axis=0, mode="fill", fill_value=0)  # [B, L, 3D]
        return unpad(_attend(padded, bias, config))

    x, _ = jax.lax.scan(functools.partial(_layer, attend=attend, config=config), x, params["layers"])
    return jnp.take(x, token_index, axis=0, mode="fill", fill_value=0)  # [B, L, D]


def _embed(emb: Params, x: jax.Array, config: BertConfig) -> jax.Array:
    """Word + position embeddings [..., D] -> the encoder's input: + token type 0, LayerNorm."""
    if config.type_vocab_size:
        x = x + emb["token_type"][0]  # every token has type 0
    return _layer_norm(x, emb["ln_scale"], emb["ln_bias"], config.layer_norm_eps)


def _attention_bias(mask: jax.Array, dtype) -> jax.Array:
    """Additive attention bias [B, 1, 1, L]: 0 where the key is a real token, a large negative number on padding."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _attend(qkv: jax.Array, bias: jax.Array, config: BertConfig) -> jax.Array:
    """Multi-head self-attention context [B, L, D] from the fused projections qkv [B, L, 3D]."""
    b, length, _ = qkv.shape
    h, hd = config.num_heads, config.head_dim
    q, k, v = (t.reshape(b, length, h, hd) for t in jnp.split(qkv, 3, axis=-1))  # [B, L, H, Dh]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias  # [B, H, L, L]
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(qkv.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, h * hd)  # [B, L, D]


def _layer(x: jax.Array, p: Params, *, attend, config: BertConfig):
    """One post-LayerNorm encoder layer over token states x [..., D]; attend(qkv [..., 3D]) -> [..., D]."""
    eps = config.layer_norm_eps
    ctx = attend(x @ p["qkv_w"] + p["qkv_b"])
    x = _layer_norm(x + ctx @ p["out_w"] + p["out_b"], p["ln1_scale"], p["ln1_bias"], eps)
    ffn = _ACTIVATIONS[config.hidden_act](x @ p["ffn_in_w"] + p["ffn_in_b"]) @ p["ffn_out_w"] + p["ffn_out_b"]
    return _layer_norm(x + ffn, p["ln2_scale"], p["ln2_bias"], eps), None


def pool(tokens: jax.Array, mask: jax.Array, *, mode: str, normalize: bool) -> jax.Array:
    """Sentence vectors from token states [B, L, D] -> [B, D] (float32)."""
    tokens = tokens.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    if mode == "mean":
        out = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    elif mode == "cls":
        out = tokens[:, 0]
    elif mode == "max":
        out = jnp.where(m > 0, tokens, -1e9).max(1)
    else:
        raise ValueError(f"pooling mode {mode!r} is not supported; expected mean, cls or max")
    if normalize:
        out = _normalize(out)
    return out


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed(
    params: Params,
    input_ids: jax.Array,
    mask: jax.Array,
    *,
    config: BertConfig,
    pooling: str,
    normalize: bool,
    dense: tuple[str, ...] = (),
    packed: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Sentence embeddings [B, E] float32 for token ids [B, L]: encoder, pooling, Dense layers, Normalize.

    packed: (positions [T], row_ids [T], token_index [B, L]) when input_ids are packed rows [T]
      (`encode_packed`).

    dense: the activation (`DENSE_ACTIVATIONS`) of each sentence-transformers Dense layer, in order;
      their weights are params["dense"][i] = {"w": [In, Out], "b": [Out]}.  E is the last layer's Out
      (D without Dense layers).  Order as sentence-transformers: Pooling -> Dense... -> Normalize.
    """
    tokens = (encode_tokens(params, input_ids, mask, config=config) if packed is None else
              encode_packed(params, input_ids, *packed, mask, config=config))  # [B, L, D]
    out = pool(tokens, mask, mode=pooling, normalize=False)  # [B, D]
    if dense:
        if len(params["dense"]) != len(dense):
            raise ValueError(f"{len(dense)} Dense activations for {len(params['dense'])} Dense layers")
        for layer, act in zip(params["dense"], dense, strict=True):
            out = DENSE_ACTIVATIONS[act](out @ layer["w"].astype(jnp.float32) + layer["b"].astype(jnp.float32))
    return _normalize(out) if normalize else out


# How to split the big matrices over a "model" mesh axis (Megatron style): the first matrix of each
# block along its output dim, the second along its input dim.  Everything else is replicated.
_MODEL_SPLIT = {
    "qkv_w": (None, None, "model"),  # [N, D, 3D]: split 3D
    "qkv_b": (None, "model"),  # [N, 3D]
    "ffn_in_w": (None, None, "model"),  # [N, D, F]: split F
    "ffn_in_b": (None, "model"),  # [N, F]
    "out_w": (None, "model", None),  # [N, D, D]: split the input D
    "ffn_out_w": (None, "model", None),  # [N, F, D]: split F
}


def param_spec(path, leaf):
    """The `Engine(param_spec=...)` for this layout: a PartitionSpec for the big layer matrices, else None."""
    from jax.sharding import PartitionSpec

    name = getattr(path[-1], "key", None)
    if len(path) == 2 and getattr(path[0], "key", None) == "layers" and name in _MODEL_SPLIT:
        return PartitionSpec(*_MODEL_SPLIT[name])
    return None
