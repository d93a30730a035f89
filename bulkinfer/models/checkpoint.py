"""Reading HF / sentence-transformers model directories: config, safetensors weights, tokenizer.

A directory holds config.json (model_type bert, roberta, xlm-roberta or distilbert; anything else
is refused), model.safetensors (or sharded *.safetensors with an index), tokenizer.json, and for
sentence-transformers models modules.json, 1_Pooling/config.json, optional Dense directories
(config.json and model.safetensors) and sentence_bert_config.json.  Weight conversion is loud:
exactly the expected tensors must be present, each with the expected shape, before anything is copied.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from bulkinfer.models.bert import FAMILIES, BertConfig, Params


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


def read_config(directory: Path) -> BertConfig:
    """The encoder config of a model directory's config.json.

    Raises CheckpointError (one line, naming the file) for a model_type outside bert, roberta,
    xlm-roberta and distilbert, a missing field, or a variant the encoder does not compute.
    """
    path = directory / "config.json"
    try:
        return BertConfig.from_hf(read_json(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _strip_prefix(tensors: dict, config: BertConfig) -> dict:
    # Task models (BertForX, RobertaForX, DistilBertForX) nest the encoder under "bert." etc. and keep
    # their heads outside it; sentence-transformers checkpoints hold the bare encoder.
    prefix = FAMILIES[config.family]
    if any(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


# Tensors a bare encoder checkpoint may hold that the encoder does not use: the pooler of BertModel /
# RobertaModel (sentence-transformers does not use it either) and position-id buffers of older saves.
_UNUSED = re.compile(r"pooler\..*|(.*\.)?position_ids|embeddings\.token_type_ids")

# Our per-layer name -> the HF name inside a layer, per weight naming scheme.
_LAYER_NAMES = {
    "bert": {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "out": "attention.output.dense", "ln1": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ln2": "output.LayerNorm",
    },
    "distilbert": {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "out": "attention.out_lin", "ln1": "sa_layer_norm",
        "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2", "ln2": "output_layer_norm",
    },
}


def _layer_names(config: BertConfig) -> tuple[str, dict[str, str]]:
    """(prefix of layer i with {i} to fill, our name -> HF name) for the config's family."""
    if config.family == "distilbert":
        return "transformer.layer.{i}.", _LAYER_NAMES["distilbert"]
    return "encoder.layer.{i}.", _LAYER_NAMES["bert"]  # bert, roberta and xlm-roberta share these


def _bert_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this family must hold for `config`, with its shape."""
    d, f = config.hidden_size, config.intermediate_size
    expected: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, d),
        "embeddings.position_embeddings.weight": (config.max_position, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    if config.type_vocab_size:
        expected["embeddings.token_type_embeddings.weight"] = (config.type_vocab_size, d)
    prefix, n = _layer_names(config)
    per_layer = {}
    for ours, shape in {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "ffn_in": (f, d), "ffn_out": (d, f)}.items():
        per_layer[n[ours] + ".weight"] = shape  # HF Linear: [out, in]
        per_layer[n[ours] + ".bias"] = shape[:1]
    for ln in ("ln1", "ln2"):
        per_layer[n[ln] + ".weight"] = per_layer[n[ln] + ".bias"] = (d,)
    for i in range(config.num_layers):
        expected.update({prefix.format(i=i) + k: s for k, s in per_layer.items()})
    return expected


def check_bert_shapes(shapes: dict[str, tuple[int, ...]], config: BertConfig) -> None:
    """Raises CheckpointError unless `shapes` (tensor name -> shape) hold exactly the tensors `config`
    implies, each with its shape: none missing, none unexpected (besides a pooler and position-id
    buffers), none misshaped.  The message names the tensor."""
    shapes = _strip_prefix(shapes, config)
    expected = _bert_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(
            f"weights lack {len(missing)} of {len(expected)} tensors config.json implies for a"
            f" {config.family} encoder, e.g. {missing[:3]}"
        )
    extra = sorted(k for k in set(shapes) - set(expected) if not _UNUSED.fullmatch(k))
    if extra:
        raise CheckpointError(
            f"weights hold {len(extra)} tensors config.json does not imply for a {config.family} encoder"
            f" ({config.num_layers} layers), e.g. {extra[:3]}; check num_hidden_layers / model_type"
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
    """Converts HF tensors of any supported family to the stacked layout of `bert.py`, checking every
    name and shape first (`check_bert_shapes`)."""
    check_bert_shapes({k: v.shape for k, v in tensors.items()}, config)
    t = _strip_prefix(tensors, config)
    prefix, n = _layer_names(config)

    def get(k):
        return np.asarray(t[k], dtype=dtype)

    def stack(fn):
        return np.stack([fn(prefix.format(i=i)) for i in range(config.num_layers)])

    # HF Linear weights are [out, in]; we multiply x @ w, so transpose to [in, out].
    layers = {
        "qkv_w": stack(lambda p: np.concatenate([get(p + n[m] + ".weight").T for m in "qkv"], axis=1)),
        "qkv_b": stack(lambda p: np.concatenate([get(p + n[m] + ".bias") for m in "qkv"])),
        "out_w": stack(lambda p: get(p + n["out"] + ".weight").T),
        "out_b": stack(lambda p: get(p + n["out"] + ".bias")),
        "ln1_scale": stack(lambda p: get(p + n["ln1"] + ".weight")),
        "ln1_bias": stack(lambda p: get(p + n["ln1"] + ".bias")),
        "ffn_in_w": stack(lambda p: get(p + n["ffn_in"] + ".weight").T),
        "ffn_in_b": stack(lambda p: get(p + n["ffn_in"] + ".bias")),
        "ffn_out_w": stack(lambda p: get(p + n["ffn_out"] + ".weight").T),
        "ffn_out_b": stack(lambda p: get(p + n["ffn_out"] + ".bias")),
        "ln2_scale": stack(lambda p: get(p + n["ln2"] + ".weight")),
        "ln2_bias": stack(lambda p: get(p + n["ln2"] + ".bias")),
    }
    embeddings = {
        "word": get("embeddings.word_embeddings.weight"),
        "position": get("embeddings.position_embeddings.weight"),
        "ln_scale": get("embeddings.LayerNorm.weight"),
        "ln_bias": get("embeddings.LayerNorm.bias"),
    }
    if config.type_vocab_size:
        embeddings["token_type"] = get("embeddings.token_type_embeddings.weight")
    return {"embeddings": embeddings, "layers": layers}


# sentence-transformers Dense `activation_function` (a torch.nn class path) -> bert.DENSE_ACTIVATIONS.
_TORCH_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}

# The module pipelines bulkinfer computes (module class names from modules.json, in order).
_SUPPORTED_MODULES = re.compile(r"Transformer Pooling( Dense)*( Normalize)?")

# Where sentence-transformers looks for the Transformer module's settings, first match wins.
_SBERT_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                  "sentence_xlm-roberta_config.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseLayer:
    """A sentence-transformers Dense module: y = activation(x @ W.T + b), W [out_features, in_features]."""

    path: str  # its directory (config.json, *.safetensors with linear.weight and linear.bias)
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a key of bert.DENSE_ACTIVATIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class SentenceSettings:
    """What a sentence-transformers directory adds to the encoder: Pooling -> Dense... -> Normalize, and
    the truncation length in tokens (special tokens included)."""

    pooling: str  # "mean", "cls" or "max"
    dense: tuple[DenseLayer, ...]
    normalize: bool
    max_length: int

    @property
    def activations(self) -> tuple[str, ...]:
        """The `dense=` argument of `bert.embed`."""
        return tuple(d.activation for d in self.dense)

    def dim(self, config: BertConfig) -> int:
        """Width of the sentence embedding."""
        return self.dense[-1].out_features if self.dense else config.hidden_size


def _sbert_config(directory: Path) -> dict:
    for name in _SBERT_CONFIGS:
        if (directory / name).exists():
            return read_json(directory / name)
    return {}


def _pooling_mode(path: Path, config: BertConfig) -> str:
    pcfg = read_json(path)
    mode = pcfg.get("pooling_mode")
    if mode is None:  # sentence-transformers before 6: one boolean per mode
        modes = [k[len("pooling_mode_") :] for k, v in pcfg.items() if k.startswith("pooling_mode_") and v]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    names = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean", "max": "max", "max_tokens": "max"}
    if len(modes) != 1 or modes[0] not in names:
        raise CheckpointError(f"{path}: pooling {modes} is not supported; need exactly one of cls, mean, max")
    dim = pcfg.get("embedding_dimension", pcfg.get("word_embedding_dimension", config.hidden_size))
    if dim != config.hidden_size:
        raise CheckpointError(f"{path}: embedding dimension {dim}, but config.json's hidden size is {config.hidden_size}")
    return names[modes[0]]


def _check_dense_shapes(layer: DenseLayer, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {"linear.weight": (layer.out_features, layer.in_features)}
    if layer.bias:
        expected["linear.bias"] = (layer.out_features,)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{layer.path}: Dense weights hold {sorted(shapes)}, its config.json implies {sorted(expected)}"
        )
    for k, want in expected.items():
        if tuple(shapes[k]) != want:
            raise CheckpointError(f"{layer.path}: Dense tensor {k}: shape {tuple(shapes[k])}, config.json implies {want}")


def _dense_layer(directory: Path, in_dim: int) -> DenseLayer:
    path = directory / "config.json"
    cfg = read_json(path)
    if cfg.get("use_residual"):
        raise CheckpointError(f"{path}: a Dense module with use_residual is not supported")
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") != "sentence_embedding":
            raise CheckpointError(f"{path}: {key} {cfg[key]!r} is not supported; only 'sentence_embedding'")
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    if act not in _TORCH_ACTIVATIONS:
        raise CheckpointError(
            f"{path}: activation_function {act!r} is not supported; supported: {', '.join(_TORCH_ACTIVATIONS)}"
        )
    try:
        layer = DenseLayer(path=str(directory), in_features=int(cfg["in_features"]),
                           out_features=int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
                           activation=_TORCH_ACTIVATIONS[act])
    except KeyError as e:
        raise CheckpointError(f"{path}: the field {e.args[0]!r} is missing") from None
    if layer.in_features != in_dim:
        raise CheckpointError(f"{path}: in_features {layer.in_features}, but the module before it gives {in_dim}")
    if not list(directory.glob("*.safetensors")) and (directory / "pytorch_model.bin").exists():
        raise CheckpointError(
            f"{directory}: Dense weights are only in pytorch_model.bin; bulkinfer reads safetensors"
            " (save the model again with sentence-transformers' safe_serialization=True)"
        )
    _check_dense_shapes(layer, safetensors_shapes(directory))
    return layer


def sentence_settings(directory: Path, config: BertConfig) -> SentenceSettings:
    """The sentence-transformers modules after the encoder (modules.json), with HF defaults for a plain
    HF directory (mean pooling).  Each Dense module's config and tensor shapes are checked here.

    max_length: sentence_bert_config.json's max_seq_length, else tokenizer_config.json's
    model_max_length (where sentence-transformers 6 saves it), capped at the position table.
    Raises CheckpointError for a module pipeline other than Transformer, Pooling, Dense..., Normalize.
    """
    pooling, dense, normalize = "mean", [], False
    modules_path = directory / "modules.json"
    if modules_path.exists():
        modules = read_json(modules_path)
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if not _SUPPORTED_MODULES.fullmatch(" ".join(kinds)):
            raise CheckpointError(
                f"{modules_path}: modules {kinds} are not supported; bulkinfer runs Transformer, Pooling,"
                " any Dense, and Normalize, in that order"
            )
        dim = config.hidden_size
        for m, kind in zip(modules, kinds, strict=True):
            sub = directory / m.get("path", "")
            if kind == "Pooling":
                pooling = _pooling_mode(sub / "config.json", config)
            elif kind == "Dense":
                dense.append(_dense_layer(sub, dim))
                dim = dense[-1].out_features
            elif kind == "Normalize":
                normalize = True
    max_len = config.max_tokens
    seq_len = _sbert_config(directory).get("max_seq_length")
    tok_cfg_path = directory / "tokenizer_config.json"
    if seq_len is None and tok_cfg_path.exists():
        seq_len = read_json(tok_cfg_path).get("model_max_length")  # 1e30 in some files: "no limit"
    if isinstance(seq_len, (int, float)) and seq_len > 0:
        max_len = min(max_len, int(min(seq_len, max_len)))
    return SentenceSettings(pooling=pooling, dense=tuple(dense), normalize=normalize, max_length=max_len)


def dense_params(settings: SentenceSettings) -> list[dict[str, np.ndarray]]:
    """The Dense layers' weights as float32 {"w": [In, Out], "b": [Out]}, in order (`bert.embed`'s params["dense"])."""
    layers = []
    for layer in settings.dense:
        tensors = read_safetensors(Path(layer.path))
        _check_dense_shapes(layer, {k: v.shape for k, v in tensors.items()})
        w = np.asarray(tensors["linear.weight"], np.float32).T  # [In, Out]
        b = np.asarray(tensors["linear.bias"], np.float32) if layer.bias else np.zeros(layer.out_features, np.float32)
        layers.append({"w": w, "b": b})
    return layers


def _honour_lowercase(tok, directory: Path) -> None:
    """Lowercasing as transformers and sentence-transformers apply it on top of tokenizer.json.

    1. tokenizer_config.json's do_lower_case wins over a BertNormalizer's `lowercase` in tokenizer.json
       (transformers builds BERT/DistilBERT tokenizers from tokenizer_config.json's settings).
    2. sentence_bert_config.json's do_lower_case prepends a Lowercase normalizer unless the normalizer
       already is or contains one (sentence-transformers' Transformer module does the same).
    """
    from tokenizers import normalizers

    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    norm = tok.normalizer
    if "do_lower_case" in tok_cfg and isinstance(norm, normalizers.BertNormalizer):
        state = json.loads(norm.__getstate__())
        if state.get("lowercase") != bool(tok_cfg["do_lower_case"]):
            state.pop("type")
            state["lowercase"] = bool(tok_cfg["do_lower_case"])
            tok.normalizer = normalizers.BertNormalizer(**state)
    if _sbert_config(directory).get("do_lower_case"):
        norm = tok.normalizer
        parts = list(norm) if isinstance(norm, normalizers.Sequence) else [] if norm is None else [norm]
        if not any(isinstance(n, normalizers.Lowercase) for n in parts):
            tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *parts])


def load_tokenizer(directory: Path, max_length: int):
    """A `tokenizers.Tokenizer` that truncates at max_length and does not pad (the runtime pads).

    It lowercases where the directory's tokenizer_config.json or sentence_bert_config.json says
    do_lower_case (see `_honour_lowercase`).
    """
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
    _honour_lowercase(tok, directory)
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok
