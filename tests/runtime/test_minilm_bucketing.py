"""The real MiniLM: bucketing and budgets change batching, never the embeddings."""

import json
from pathlib import Path

import numpy as np
import pytest

from bulkinfer.models.text import TextEmbedder
from bulkinfer.runtime import Bucketing

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def texts_and_reference():
    texts = json.loads((FIXTURES / "minilm_reference_texts.json").read_text(encoding="utf-8"))
    reference = np.load(FIXTURES / "minilm_reference.npy")
    return texts[:48], reference[:48]


def test_bucketings_agree_with_each_other_and_with_sentence_transformers(texts_and_reference):
    texts, reference = texts_and_reference
    # Padded batches: the bucket ladder decides their shapes (packed ones are compared below).
    coarse = TextEmbedder.from_name(
        "minilm", max_length=32, bucketing=Bucketing(lengths=(32,), token_budget=256, ladder=0), packed=False).load()
    fine = TextEmbedder.from_name(
        "minilm", max_length=32, bucketing=Bucketing(lengths=(8, 16, 24), token_budget=96, ladder=1),
        packed=False).load()
    packed = TextEmbedder.from_name("minilm", max_length=32, bucketing=Bucketing(lengths=(8, 16, 24), token_budget=96),
                                    packed=True).load()
    a, b, c = coarse.embed(texts), fine.embed(texts), packed.embed(texts)
    assert fine.engine.stats.batches > coarse.engine.stats.batches  # really batched differently
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(c, b, atol=1e-5)
    # Texts that fit in 32 tokens are not truncated, so they match the sentence-transformers reference.
    short = np.array([len(ids) < 32 for ids in fine.tokenize(texts)])
    assert short.sum() >= 10
    np.testing.assert_allclose(b[short], reference[short], atol=1e-4)
