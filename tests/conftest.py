import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the suite and the subprocesses it starts: each batch shape compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def reference():
    """(texts, sentence-transformers embeddings) written by scripts/make_reference_embeddings.py."""
    texts = json.loads((FIXTURES / "minilm_reference_texts.json").read_text(encoding="utf-8"))
    return texts, np.load(FIXTURES / "minilm_reference.npy")


@pytest.fixture(scope="session")
def minilm_spec():
    from bulkinfer import TextEmbedder

    return TextEmbedder.from_name("minilm")


@pytest.fixture(scope="session")
def minilm(minilm_spec):
    """The process's shared loaded MiniLM (the same instance BulkInference uses in this process)."""
    from bulkinfer.beam.loading import load_shared

    return load_shared(minilm_spec)
