"""Reading HF / sentence-transformers model directories: config, safetensors weights, tokenizer.

A directory holds config.json, model.safetensors (or sharded *.safetensors with an index),
tokenizer.json, and for sentence-transformers models modules.json, 1_Pooling/config.json and
sentence_bert_config.json.  Weight conversion is loud: every expected tensor must be present with
the expected shape before anything is copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bulkinfer.models.bert import BertConfig, Params


class CheckpointError(ValueError):
    """A model directory is missing files or holds files that do not fit together."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a directory's *.safetensors files, as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights file")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read weights ({e}); the file may be truncated or corrupt") from None
    return tensors


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # BertForX checkpoints nest the encoder under "bert."; sentence-transformers ones do not.
    if any(k.startswith("bert.") for k in tensors):
        return {k[len("bert.") :]: v for k, v in tensors.items() if k.startswith("bert.")}
    return tensors


def _bert_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF BertModel checkpoint must hold for `config`, with its shape."""
    d, f = config.hidden_size, config.intermediate_size
    expected: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, d),
        "embeddings.position_embeddings.weight": (config.max_position, d),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    per_layer = {
        "attention.self.query.weight": (d, d),
        "attention.self.query.bias": (d,),
        "attention.self.key.weight": (d, d),
        "attention.self.key.bias": (d,),
        "attention.self.value.weight": (d, d),
        "attention.self.value.bias": (d,),
        "attention.output.dense.weight": (d, d),
        "attention.output.dense.bias": (d,),
        "attention.output.LayerNorm.weight": (d,),
        "attention.output.LayerNorm.bias": (d,),
        "intermediate.dense.weight": (f, d),
        "intermediate.dense.bias": (f,),
        "output.dense.weight": (d, f),
        "output.dense.bias": (d,),
        "output.LayerNorm.weight": (d,),
        "output.LayerNorm.bias": (d,),
    }
    for i in range(config.num_layers):
        expected.update({f"encoder.layer.{i}.{k}": s for k, s in per_layer.items()})
    return expected


def check_bert_shapes(shapes: dict[str, tuple[int, ...]], config: BertConfig) -> None:
    """Raises CheckpointError unless `shapes` (tensor name -> shape) hold every tensor `config` implies."""
    shapes = _strip_prefix(shapes)
    expected = _bert_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(
            f"weights lack {len(missing)} of {len(expected)} tensors config.json implies, e.g. {missing[:3]}"
        )
    wrong = [(k, tuple(shapes[k]), s) for k, s in expected.items() if tuple(shapes[k]) != s]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} tensors do not match config.json, e.g. {k}: shape {got}, config implies {want}"
        )


def safetensors_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers, without reading the weights."""
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights file")
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read weights ({e}); the file may be truncated or corrupt") from None
    return shapes


def bert_params(tensors: dict[str, np.ndarray], config: BertConfig, dtype=np.float32) -> Params:
    """Converts HF BertModel tensors to the stacked layout of `bert.py`, checking every name and shape."""
    check_bert_shapes({k: v.shape for k, v in tensors.items()}, config)
    t = _strip_prefix(tensors)
    n = config.num_layers

    def get(k):
        return np.asarray(t[k], dtype=dtype)

    def stack(fn):
        return np.stack([fn(f"encoder.layer.{i}.") for i in range(n)])

    # HF Linear weights are [out, in]; we multiply x @ w, so transpose to [in, out].
    layers = {
        "qkv_w": stack(lambda p: np.concatenate(
            [get(p + f"attention.self.{m}.weight").T for m in ("query", "key", "value")], axis=1)),
        "qkv_b": stack(lambda p: np.concatenate(
            [get(p + f"attention.self.{m}.bias") for m in ("query", "key", "value")])),
        "out_w": stack(lambda p: get(p + "attention.output.dense.weight").T),
        "out_b": stack(lambda p: get(p + "attention.output.dense.bias")),
        "ln1_scale": stack(lambda p: get(p + "attention.output.LayerNorm.weight")),
        "ln1_bias": stack(lambda p: get(p + "attention.output.LayerNorm.bias")),
        "ffn_in_w": stack(lambda p: get(p + "intermediate.dense.weight").T),
        "ffn_in_b": stack(lambda p: get(p + "intermediate.dense.bias")),
        "ffn_out_w": stack(lambda p: get(p + "output.dense.weight").T),
        "ffn_out_b": stack(lambda p: get(p + "output.dense.bias")),
        "ln2_scale": stack(lambda p: get(p + "output.LayerNorm.weight")),
        "ln2_bias": stack(lambda p: get(p + "output.LayerNorm.bias")),
    }
    embeddings = {
        "word": get("embeddings.word_embeddings.weight"),
        "position": get("embeddings.position_embeddings.weight"),
        "token_type": get("embeddings.token_type_embeddings.weight"),
        "ln_scale": get("embeddings.LayerNorm.weight"),
        "ln_bias": get("embeddings.LayerNorm.bias"),
    }
    return {"embeddings": embeddings, "layers": layers}


def sentence_settings(directory: Path, config: BertConfig) -> tuple[str, bool, int]:
    """(pooling mode, normalize, max_seq_length) from the sentence-transformers files, with HF defaults."""
    pooling, normalize, max_len = "mean", False, config.max_position
    modules_path = directory / "modules.json"
    if modules_path.exists():
        modules = read_json(modules_path)
        for m in modules:
            kind = m.get("type", "")
            if kind.endswith(".Pooling"):
                pcfg = read_json(directory / m.get("path", "1_Pooling") / "config.json")
                modes = [k for k in ("cls_token", "mean_tokens", "max_tokens") if pcfg.get(f"pooling_mode_{k}")]
                if len(modes) != 1:
                    raise CheckpointError(f"{directory}: pooling {modes} is not supported; need exactly one mode")
                pooling = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[modes[0]]
            elif kind.endswith(".Normalize"):
                normalize = True
    sbert_path = directory / "sentence_bert_config.json"
    if sbert_path.exists():
        max_len = int(read_json(sbert_path).get("max_seq_length", max_len))
    return pooling, normalize, min(max_len, config.max_position)


def load_tokenizer(directory: Path, max_length: int):
    """A `tokenizers.Tokenizer` that truncates at max_length and does not pad (the runtime pads)."""
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok
