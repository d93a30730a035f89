"""GGUF files (llama.cpp's single-file checkpoints) as Hugging Face-style checkpoints.

Read with the `gguf` package (`GGUFReader`); every tensor is dequantized to float32 at load (Q4_0, Q4_1,
Q8_0, K-quants, ... through `gguf.quants.dequantize`), so the JAX decoder runs on plain float weights.
What comes out is what an HF directory gives: a config.json-style dict, tensors under HF state-dict
names, the tokenizer (built from the file's metadata, `gguf_tokenizer`), the special token ids and the
chat template, so `decoder.DecoderConfig.from_hf` / `decoder.params_from_hf` take it unchanged.

    >>> checkpoint = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> checkpoint.config["model_type"], checkpoint.config["num_key_value_heads"]
    ('llama', 3)
    >>> checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"].shape     # [out, in] float32
    (576, 576)
    >>> checkpoint.tokenizer.encode("Hello").ids

Architectures (`general.architecture`): llama (also Mistral, SmolLM, TinyLlama: llama.cpp writes those
as llama) and qwen2.  llama.cpp's converter permutes the rows of q and k for its RoPE layout
(convert_hf_to_gguf.py, `LlamaModel.permute`); `_unpermute` undoes it as transformers' GGUF loader does
(`LlamaTensorProcessor._reverse_permute_weights`), so the weights use HF's rotate-half RoPE.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bulkinfer.models.checkpoint import CheckpointError

ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name -> HF state-dict name, for llama-style architectures ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Present in some files but not weights of the model (llama.cpp's precomputed RoPE tables).
_SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFCheckpoint:
    """A GGUF file's contents in Hugging Face terms.

    config: config.json keys (model_type, vocab_size, hidden_size, ..., bos_token_id, eos_token_id).
    tensors: HF state-dict name -> float32 array ([out, in] for linear weights); empty when read without
      tensors.
    shapes: HF state-dict name -> the tensor's shape once dequantized (known without reading the data).
    tokenizer: a `tokenizers.Tokenizer` built from the metadata.
    bos_token_id, eos_token_ids, pad_token_id: from tokenizer.ggml.*_token_id (eos also eot/eom ids).
    add_bos_token: whether `tokenizer.encode` adds BOS (tokenizer.ggml.add_bos_token).
    chat_template: tokenizer.chat_template, or None.
    metadata: every key-value of the file except the vocabulary arrays.
    """

    config: dict
    tensors: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    tokenizer: Any
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    metadata: dict

    def token(self, token_id: int | None) -> str | None:
        """The text of a token id (for a chat template's bos_token / eos_token), None for None."""
        return None if token_id is None else self.tokenizer.id_to_token(token_id)


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(os.fspath(path))
    except (ValueError, OSError, KeyError) as e:  # the gguf package raises ValueError for a bad magic/version
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def _metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """Every key-value of a GGUF file (tokenizer.ggml.tokens etc. included): strings, numbers, bools,
    lists.  Raises CheckpointError for a missing or unreadable file."""
    return _metadata(_reader(path))


def hf_config(metadata: Mapping, tensor_names: set[str] | frozenset[str]) -> dict:
    """An HF config.json dict from GGUF metadata ({arch}.context_length, embedding_length, block_count,
    feed_forward_length, attention.head_count(_kv), attention.key_length, rope.freq_base,
    rope.scaling.*, attention.layer_norm_rms_epsilon, vocab_size) and the file's tensor names
    (tie_word_embeddings: no output.weight; attention_bias: q/k/v biases).

    Raises CheckpointError for an architecture outside ARCHITECTURES, a missing key, partial rotary
    embeddings, or llama.cpp RoPE factor tables (rope_freqs.weight; Llama 3.1-style scaling)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF general.architecture {arch!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)} (use the model's HF directory for others)")

    def get(key, default=...):
        full = f"{arch}.{key}"
        if full in metadata:
            return metadata[full]
        if default is ...:
            raise CheckpointError(f"the GGUF file lacks {full!r}, which a {arch} model needs")
        return default

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary = int(get("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"GGUF {arch}.rope.dimension_count {rotary} differs from the head size {head_dim}: "
                              "partial rotary embeddings are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError("the GGUF file carries llama.cpp RoPE factors (rope_freqs.weight, Llama 3.1-style "
                              "scaling), which are not supported; use the model's HF directory")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens is not None else ...)
    config = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "tokenizer.ggml." + key.replace("pad_", "padding_")
        if gguf_key in metadata:
            config[key] = int(metadata[gguf_key])
    return config


def _rope_scaling(metadata: Mapping, arch: str) -> dict | None:
    """HF rope_scaling from {arch}.rope.scaling.{type, factor, original_context_length} (llama.cpp's keys)."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise CheckpointError(f"GGUF {arch}.rope.scaling.type {kind!r} is not supported (linear and yarn are)")


def hf_name(gguf_name: str) -> str | None:
    """The HF state-dict name of a GGUF tensor name (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`); None for tensors that are not model weights
    (rope_freqs.weight); raises CheckpointError for a name this module does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} is not a known llama-style weight name")


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows grouped per head as [heads, 2, head_dim/2] (interleaved
    RoPE pairs) back to HF's [heads, head_dim/2, 2] order -- the inverse of `LlamaModel.permute` in
    llama.cpp's convert_hf_to_gguf.py.  weight: [heads * head_dim, ...]."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(path, tensor, config: dict) -> np.ndarray:
    """One tensor as float32 in HF layout ([out, in] for linear weights; q/k rows un-permuted for llama)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        weight = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has quantization {qtype.name}, which the "
                              f"gguf package cannot dequantize ({e}); requantize the file (e.g. Q8_0)") from e
    if config["model_type"] == "llama":  # llama.cpp's qwen2 converter does not permute
        if tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = _unpermute(weight, config["num_key_value_heads"])
    return weight


def read_gguf(path: str | os.PathLike, *, tensors: bool = True) -> GGUFCheckpoint:
    """A GGUF file as an HF-style checkpoint (see GGUFCheckpoint).  tensors=False reads everything but
    the weights (fast: a check before a pipeline starts) and still checks every tensor's name and type.

    Raises CheckpointError naming the file and the problem: not GGUF, an unsupported architecture or
    tokenizer, an unknown tensor name, a quantization type the gguf package cannot dequantize."""
    from bulkinfer.models.gguf_tokenizer import tokenizer_from_metadata

    reader = _reader(path)
    metadata = _metadata(reader)
    names = frozenset(t.name for t in reader.tensors)
    try:
        config = hf_config(metadata, names)
        tokenizer = tokenizer_from_metadata(metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    out: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        try:
            name = hf_name(tensor.name)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if name is None:
            continue
        if name in shapes:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} appears twice")
        shapes[name] = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if tensors:
            out[name] = _dequantized(path, tensor, config)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in metadata and int(metadata[key]) not in eos_ids:
            eos_ids.append(int(metadata[key]))
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama"))
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    return GGUFCheckpoint(
        config=config, tensors=out, shapes=shapes, tokenizer=tokenizer,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos_ids),
        pad_token_id=None if pad is None else int(pad), add_bos_token=add_bos,
        chat_template=metadata.get("tokenizer.chat_template"),
        metadata={k: v for k, v in metadata.items() if k not in big},
    )
