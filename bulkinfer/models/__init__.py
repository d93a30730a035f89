"""Model families as pure JAX functions, and checkpoint loading.  Nothing here imports Beam."""

from bulkinfer.models.bert import BertConfig
from bulkinfer.models.checkpoint import CheckpointError
from bulkinfer.models.registry import BUILTIN_MODELS, resolve_model_dir

__all__ = ["BUILTIN_MODELS", "BertConfig", "CheckpointError", "resolve_model_dir"]
