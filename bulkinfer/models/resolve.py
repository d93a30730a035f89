"""What users pass as a model, made into a model spec: a built-in name, a model directory, or a spec.

    >>> model_spec("minilm")                       # TextEmbedder for the built-in all-MiniLM-L6-v2
    >>> model_spec("gs://bucket/my-bert")          # TextEmbedder for a directory on any Beam filesystem
    >>> model_spec("path/to/Qwen2-0.5B")           # LanguageModel: config.json's model_type is a decoder
    >>> model_spec(bulkinfer.JaxModel(fn, ...))    # a spec is returned as it is

`BulkInference`, `JaxModelHandler` and the CLI's `--model` all go through `model_spec`, so they accept
the same values, and a value that is none of these fails where the pipeline is built, with one line.
"""

from __future__ import annotations

import importlib

from bulkinfer.models.checkpoint import CheckpointError, read_json
from bulkinfer.models.registry import BUILTIN_FUNCTIONS, BUILTIN_MODELS, builtin_names, resolve_model_dir


def model_spec(model, **settings):
    """A model spec for `model`.  settings: passed to the spec's constructor (e.g. dtype=, max_length=).

    Raises CheckpointError (a ValueError) for a string that is neither a known name nor a model directory,
    and TypeError for anything else that is not a spec (an object with `load()`).
    """
    if hasattr(model, "load"):
        if settings:
            raise ValueError(f"settings {sorted(settings)} apply to a model name or directory, not to a spec; "
                             "set them on the spec itself")
        return model
    if not isinstance(model, str | bytes) and not hasattr(model, "__fspath__"):
        raise TypeError(
            f"model {model!r} is neither a built-in name ({', '.join(builtin_names())}), a model "
            "directory nor a model spec (an object with load(), such as bulkinfer.JaxModel(...))")
    name = str(model.decode() if isinstance(model, bytes) else model)
    if name in BUILTIN_FUNCTIONS:
        return importlib.import_module(BUILTIN_FUNCTIONS[name]).spec(**settings)
    if _is_decoder(name):
        from bulkinfer.models.lm import LanguageModel

        return LanguageModel.from_name(name, **settings)
    from bulkinfer.models.text import TextEmbedder

    return TextEmbedder.from_name(name, **settings)


def _is_decoder(name: str) -> bool:
    """Whether the directory's config.json names a decoder family; refuses, listing every family, a
    model_type that is neither a text encoder nor a decoder."""
    from bulkinfer.models.bert import FAMILIES as ENCODERS
    from bulkinfer.models.decoder import FAMILIES as DECODERS

    if name in BUILTIN_MODELS:
        return False
    _, directory = resolve_model_dir(name)
    config = read_json(directory / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in DECODERS:
        return True
    if model_type in ENCODERS:
        return False
    raise CheckpointError(f"{directory / 'config.json'}: model_type {model_type!r} is not supported; text encoders: "
                          f"{', '.join(ENCODERS)}; decoder LMs: {', '.join(DECODERS)}")


__all__ = ["CheckpointError", "model_spec"]
