import dataclasses

import numpy as np
import pytest

from bulkinfer.models import text


def _texts(reference):
    texts, _ = reference  # edge cases included: "", non-ASCII, texts truncated at 256 tokens
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.permutation(np.arange(4 * len(texts)) % len(texts))]


@pytest.mark.parametrize("threads", [1, 3])
def test_token_ids_equal_the_tokenizers_in_input_order(minilm, reference, monkeypatch, threads):
    texts = _texts(reference)
    assert len(texts) >= threads * text.MIN_ROWS_PER_THREAD  # so that 3 threads each take a share
    monkeypatch.setattr(minilm, "tokenizer_threads", threads)
    got = minilm.tokenize(texts)
    expected = [e.ids for e in minilm.tokenizer.encode_batch(texts)]
    assert len(got) == len(texts)
    assert all(g.dtype == np.int32 for g in got)
    assert [g.tolist() for g in got] == expected


def test_short_calls_and_generators_are_tokenized_alike(minilm, reference, monkeypatch):
    texts = _texts(reference)[:10]
    monkeypatch.setattr(minilm, "tokenizer_threads", 4)  # 10 rows: one share, no thread hand-over
    got = minilm.tokenize(t for t in texts)
    assert [g.tolist() for g in got] == [e.ids for e in minilm.tokenizer.encode_batch(texts)]


def test_tokenizer_threads_must_be_positive(minilm_spec):
    with pytest.raises(ValueError, match="tokenizer_threads must be >= 1"):
        dataclasses.replace(minilm_spec, tokenizer_threads=0)
