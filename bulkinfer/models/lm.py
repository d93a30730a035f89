"""Decoder language models from HF directories and GGUF files: the spec (`LanguageModel`) and the loaded model.

A directory holds, as `save_pretrained` writes it: config.json (model_type llama, mistral, qwen2 or gpt2),
model.safetensors or a sharded model.safetensors.index.json with its shards, tokenizer.json,
tokenizer_config.json (bos/eos tokens, the chat template), chat_template.jinja (transformers >= 4.43
writes the template there) and generation_config.json (sampling defaults, eos ids).

    >>> model = LanguageModel.from_name("path/to/Qwen2-0.5B-Instruct")   # checks names and shapes
    >>> lm = model.load()                                                  # once per process
    >>> prompt = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    >>> ids = lm.encode(prompt, add_special_tokens=False)                 # the template holds the BOS
    >>> logits, cache = decoder.forward(lm.params, tokens, positions, cache, slots, config=lm.config)

A GGUF file (llama.cpp's format; `models/gguf_file.py`) loads the same way: `LanguageModel.from_name("smollm2")`
(the built-in SmolLM2-135M-Instruct) or `from_name("path/to/model.Q4_K_M.gguf")`; its weights are dequantized
to float32 at load and its tokenizer and chat template come from the file's metadata.

The generation loop (runtime/generate.py) drives `decoder.forward` with `LoadedLanguageModel.params`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bulkinfer.models import decoder, weights
from bulkinfer.models.checkpoint import CheckpointError, read_json
from bulkinfer.models.registry import BUILTIN_LANGUAGE_MODELS, model_dir_here, resolve_language_model

_DTYPES = ("float32", "bfloat16")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LanguageModel:
    """What to load: a picklable, hashable description of a decoder LM, cheap to send to workers.

    path: the model directory (or GGUF file) on the machine that made the spec.  `path` and `source` are not part of the
      spec's identity (compare=False; `digest` is): a job resumes after the directory moves.
    name: the model's name in reports and on the server.
    source: what the user gave (a path, a URL such as gs://bucket/model-dir); a worker where `path` does
      not exist re-resolves the model from it.  Default: `path`.
    digest: the model's identity, `weights.fingerprint` of the directory.  Default: computed from `path`;
      `load()` refuses a directory whose content has another digest.
    dtype: the parameters' dtype, "float32" or "bfloat16" (logits are always float32).
    warmup: compile the generation shapes at load time (read by the generation runtime).
    compilation_cache_dir: a persistent XLA compilation cache shared across processes and runs.
    """

    path: str = dataclasses.field(compare=False)
    name: str
    source: str = dataclasses.field(default="", compare=False)
    digest: str = ""
    dtype: str = "float32"
    warmup: bool = False
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.path)
        if not self.digest:
            object.__setattr__(self, "digest", weights.fingerprint(self.path))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; expected one of {_DTYPES}")

    @classmethod
    def from_name(cls, name_or_path: str, **settings) -> LanguageModel:
        """A built-in name (`smollm2`), a path to an HF decoder directory or a `.gguf` file, or a URL of
        either on any Beam filesystem.  Checks the checkpoint (`check`).  Raises CheckpointError naming the
        value and what is wrong."""
        known = {f.name for f in dataclasses.fields(cls)} - {"path", "name", "source", "digest"}
        if set(settings) - known:
            raise ValueError(f"settings {sorted(set(settings) - known)} do not apply to a decoder LM "
                             f"({name_or_path}); it takes {sorted(known)}")
        name, path = resolve_language_model(name_or_path)
        source = name_or_path if name_or_path in BUILTIN_LANGUAGE_MODELS or "://" in name_or_path else str(path)
        spec = cls(path=str(path), name=name, source=source, digest=weights.fingerprint(path), **settings)
        spec.check()
        return spec

    def check(self) -> None:
        """Validates the checkpoint without reading the weights' data: config.json, the tokenizer files, and
        every tensor's name and shape (safetensors headers; a GGUF's metadata and tensor list), so a bad
        checkpoint fails before a pipeline."""
        if is_gguf(self.path):
            check_gguf(Path(self.path))
            return
        directory = Path(self.path)
        config = read_config(directory)
        TokenizerFiles.read(directory)
        try:
            decoder.check_hf_shapes(config, safetensors_shapes(directory))
        except ValueError as e:
            raise CheckpointError(f"{directory}: {e}") from None

    def load(self) -> LoadedLanguageModel:
        local = model_dir_here(path=self.path, source=self.source, digest=self.digest)
        spec = dataclasses.replace(self, path=str(local))
        return load_gguf(spec) if is_gguf(local) else load_directory(spec)


def read_config(directory: Path) -> decoder.DecoderConfig:
    """The DecoderConfig of a directory's config.json; CheckpointError naming the file and the field."""
    path = directory / "config.json"
    try:
        return decoder.DecoderConfig.from_hf(read_json(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(directory: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read -> the tensor names the index puts in each (None for model.safetensors).

    model.safetensors first (as transformers), else model.safetensors.index.json and the shards it names.
    Raises CheckpointError for a directory with neither, a malformed index or a shard the index names
    that is missing."""
    if (directory / SINGLE).is_file():
        return {directory / SINGLE: None}
    index_path = directory / INDEX
    if not index_path.is_file():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
        hint = f" (found {', '.join(others)}: convert them to safetensors)" if others else ""
        raise CheckpointError(f"{directory}: neither {SINGLE} nor {INDEX}{hint}")
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map of tensor name -> file")
    files: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or file.startswith("."):
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {file!r}, not a file name in the directory")
        files.setdefault(directory / file, []).append(name)
    missing = sorted(p.name for p in files if not p.is_file())
    if missing:
        raise CheckpointError(f"{index_path}: names shards that are missing: {', '.join(missing)}")
    return files


def _header(path: Path) -> dict:
    """A safetensors file's JSON header (name -> dtype, shape, offsets), without reading tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= 100 << 20:
                raise ValueError(f"header size {n} is not plausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


def safetensors_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over the directory's weight files (headers only).  Raises CheckpointError when
    a shard lacks a tensor its index names, holds one the index puts elsewhere, or two files hold one name."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, listed in weight_files(directory).items():
        header = _header(path)
        if listed is not None:
            absent = sorted(set(listed) - set(header))
            if absent:
                raise CheckpointError(f"{path}: lacks tensors that {INDEX} puts there: {', '.join(absent[:6])}")
            stray = sorted(set(header) - set(listed))
            if stray:
                raise CheckpointError(f"{path}: holds tensors that {INDEX} does not put there: {', '.join(stray[:6])}")
        for name, info in header.items():
            if name in shapes:
                raise CheckpointError(f"{directory}: tensor {name!r} is in more than one weights file")
            shapes[name] = tuple(info["shape"])
    return shapes


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's weight files (single or sharded), as numpy arrays (bfloat16 included)."""
    from bulkinfer.models.safetensors_file import load_safetensors

    safetensors_shapes(directory)  # the index and the shards agree
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(directory):
        tensors.update(load_safetensors(path))
    return tensors


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{value!r} is not a token id or a list of them")
    return list(values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerFiles:
    """What a directory's tokenizer and generation files say: the tokenizer, special tokens, chat template,
    generation defaults.  `read` raises CheckpointError naming the file."""

    tokenizer: object  # tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    generation_config: dict

    @classmethod
    def read(cls, directory: Path) -> TokenizerFiles:
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: file is missing (decoder directories need the fast tokenizer's "
                                  "tokenizer.json; save it with transformers' save_pretrained)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()  # a prompt over the context is the caller's dead letter, never cut
        tok_config = _optional_json(directory / "tokenizer_config.json")
        template = None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            template = tok_config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if template is not None and not isinstance(template, str):
                raise CheckpointError(f"{directory / 'tokenizer_config.json'}: chat_template is not a string")
        return cls(tokenizer=tokenizer, bos_token=_token_text(tok_config.get("bos_token")),
                   eos_token=_token_text(tok_config.get("eos_token")), chat_template=template,
                   generation_config=_optional_json(directory / "generation_config.json"))


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class LoadedLanguageModel:
    """A loaded decoder LM: config, parameters on the default device, tokenizer, special tokens, chat template.

    Built by `load_directory` (HF directories); any other checkpoint format builds one from the same parts.

    config: the DecoderConfig (static argument of `decoder.forward`).
    params: the parameter pytree (jax arrays of the spec's dtype).
    tokenizer: a `tokenizers.Tokenizer` (no padding, no truncation).
    bos_token_id: the model's BOS id, or None.
    eos_token_ids: the ids that end a completion (transformers' generate stops on the same ones).
    chat_template: the Jinja chat template source, or None.
    generation_config: the sampling defaults (generation_config.json) as a dict, {} when absent.
    bos_token, eos_token: their texts, as a chat template sees them (default: the ids' tokens).
    """

    def __init__(self, *, name: str, config: decoder.DecoderConfig, params, tokenizer,
                 bos_token_id: int | None, eos_token_ids: Sequence[int], chat_template: str | None = None,
                 generation_config: Mapping | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, load_s: float = 0.0):
        self.name = name
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.chat_template = chat_template
        self.generation_config = dict(generation_config or {})
        if bos_token is None and bos_token_id is not None:
            bos_token = tokenizer.id_to_token(bos_token_id)
        if eos_token is None and self.eos_token_ids:
            eos_token = tokenizer.id_to_token(self.eos_token_ids[0])
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        self.load_s = load_s

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` as transformers' fast tokenizer gives them (tokenizer.json's post-processor
        adds the BOS where the model has one).  Text from `apply_chat_template` already holds its special
        tokens: encode it with add_special_tokens=False."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = True,
                            **variables) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) through the model's chat template,
        rendered with transformers' conventions (`chat_template.ChatTemplate`; bos_token and eos_token set).
        variables: more template variables (e.g. tools=None).  Raises ChatTemplateError (a ValueError) when
        the model has no chat template or the template refuses the messages."""
        from bulkinfer.models.chat_template import ChatTemplate, ChatTemplateError

        if self.chat_template is None:
            raise ChatTemplateError(f"model {self.name!r} has no chat template (no chat_template.jinja and no "
                                    "chat_template in tokenizer_config.json); pass plain prompts")
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, {"bos_token": self.bos_token or "",
                                                               "eos_token": self.eos_token or ""})
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, **variables)


def special_token_ids(directory: Path, model_config: Mapping, files: TokenizerFiles,
                      vocab_size: int) -> tuple[int | None, tuple[int, ...]]:
    """(bos id, eos ids) of an HF directory as transformers' generate takes them: generation_config.json's
    bos/eos_token_id (an int or a list), else config.json's, else tokenizer_config.json's tokens.
    Raises CheckpointError for ids that are not ints in [0, vocab_size)."""
    gen = files.generation_config
    try:
        bos = _ids(gen["bos_token_id"] if "bos_token_id" in gen else model_config.get("bos_token_id"))
        eos = _ids(gen["eos_token_id"] if "eos_token_id" in gen else model_config.get("eos_token_id"))
    except ValueError as e:
        raise CheckpointError(f"{directory}: bos/eos token id {e}") from None
    if not bos and files.bos_token is not None:
        bos = _ids(files.tokenizer.token_to_id(files.bos_token))
    if not eos and files.eos_token is not None:
        eos = _ids(files.tokenizer.token_to_id(files.eos_token))
    bad = [i for i in bos + eos if i >= vocab_size]
    if bad:
        raise CheckpointError(f"{directory}: special token ids {bad} are outside the vocabulary ({vocab_size})")
    return (bos[0] if bos else None), tuple(dict.fromkeys(eos))


def load_directory(spec: LanguageModel) -> LoadedLanguageModel:
    """Loads an HF decoder directory (spec.path, on this machine) with the spec's dtype.  Raises
    CheckpointError naming the file and the tensor or field at fault."""
    import jax

    t0 = time.perf_counter()
    if spec.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", spec.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    directory = Path(spec.path)
    config = read_config(directory)
    files = TokenizerFiles.read(directory)
    bos_id, eos_ids = special_token_ids(directory, read_json(directory / "config.json"), files, config.vocab_size)
    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[spec.dtype]
    try:
        params = decoder.params_from_hf(config, read_tensors(directory), dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return LoadedLanguageModel(
        name=spec.name, config=config, params=jax.device_put(params), tokenizer=files.tokenizer,
        bos_token_id=bos_id, eos_token_ids=eos_ids, chat_template=files.chat_template,
        generation_config=files.generation_config, bos_token=files.bos_token, eos_token=files.eos_token,
        load_s=time.perf_counter() - t0)


def is_gguf(path: str | Path) -> bool:
    """A GGUF file (rather than an HF directory): a file named *.gguf."""
    return Path(path).is_file() and Path(path).suffix == ".gguf"


def check_gguf(path: Path) -> None:
    """Validates a GGUF file without dequantizing: its metadata (architecture, config, tokenizer) and every
    tensor's name and shape.  Raises CheckpointError naming the file."""
    from bulkinfer.models.gguf_file import read_gguf

    checkpoint = read_gguf(path, tensors=False)
    try:
        decoder.check_hf_shapes(decoder.DecoderConfig.from_hf(checkpoint.config), checkpoint.shapes)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_gguf(spec: LanguageModel) -> LoadedLanguageModel:
    """Loads a GGUF file (spec.path, on this machine): weights dequantized to float32 and cast to the spec's
    dtype, the tokenizer, special tokens and chat template from the metadata; no generation defaults (a GGUF
    has no generation_config).  Raises CheckpointError naming the file and what is wrong."""
    import jax

    from bulkinfer.models.gguf_file import read_gguf

    t0 = time.perf_counter()
    if spec.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", spec.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    path = Path(spec.path)
    checkpoint = read_gguf(path)
    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[spec.dtype]
    try:
        config = decoder.DecoderConfig.from_hf(checkpoint.config)
        params = decoder.params_from_hf(config, checkpoint.tensors, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    bad = [i for i in (checkpoint.bos_token_id, *checkpoint.eos_token_ids) if i is not None and i >= config.vocab_size]
    if bad:
        raise CheckpointError(f"{path}: special token ids {bad} are outside the vocabulary ({config.vocab_size})")
    return LoadedLanguageModel(
        name=spec.name, config=config, params=jax.device_put(params), tokenizer=checkpoint.tokenizer,
        bos_token_id=checkpoint.bos_token_id, eos_token_ids=checkpoint.eos_token_ids,
        chat_template=checkpoint.chat_template, load_s=time.perf_counter() - t0)
