import numpy as np
import pytest

from bulkinfer.models import bert, checkpoint
from bulkinfer.testing import cosine


def test_matches_sentence_transformers(minilm, reference):
    texts, expected = reference
    got = minilm.embed(texts)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert cosine(got, expected).min() >= 0.9999  # the criterion
    np.testing.assert_allclose(got, expected, atol=1e-5)  # and far tighter: measured max |diff| ~3e-7
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_fixture_exercises_truncation_and_edge_cases(minilm, reference):
    texts, _ = reference
    lengths = [len(e.ids) for e in minilm.tokenizer.encode_batch(texts)]
    assert max(lengths) == minilm.max_length == 256  # truncated at max_seq_length
    assert sum(n == 256 for n in lengths) >= 20 and "" in texts


def test_output_does_not_depend_on_batch_neighbours(minilm, reference):
    texts, _ = reference
    alone = np.stack([minilm.embed([t])[0] for t in texts[:5]])
    together = minilm.embed(texts[:5] + texts[-40:])[:5]
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_pool_modes_on_a_tiny_input():
    tokens = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)  # [B=1, L=3, D=2]
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(bert.pool(tokens, mask, mode="mean", normalize=False), [[2.0, 3.0]])
    np.testing.assert_allclose(bert.pool(tokens, mask, mode="max", normalize=False), [[3.0, 4.0]])
    np.testing.assert_allclose(bert.pool(tokens, mask, mode="cls", normalize=False), [[1.0, 2.0]])
    out = bert.pool(tokens, mask, mode="mean", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(out), 1.0, rtol=1e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="not divisible"):
        bert.BertConfig(vocab_size=10, hidden_size=10, num_layers=1, num_heads=3, intermediate_size=4,
                        max_position=8)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        bert.BertConfig.from_hf({"model_type": "bert", "vocab_size": 10, "hidden_size": 8})


def _tiny_config():
    return bert.BertConfig(vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16,
                           max_position=16)


def _tiny_tensors(config, rng):
    d, f = config.hidden_size, config.intermediate_size
    t = {
        "embeddings.word_embeddings.weight": (config.vocab_size, d),
        "embeddings.position_embeddings.weight": (config.max_position, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            t[p + f"attention.self.{m}.weight"], t[p + f"attention.self.{m}.bias"] = (d, d), (d,)
        t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"] = (d, d), (d,)
        t[p + "attention.output.LayerNorm.weight"] = t[p + "attention.output.LayerNorm.bias"] = (d,)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = (f, d), (f,)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = (d, f), (d,)
        t[p + "output.LayerNorm.weight"] = t[p + "output.LayerNorm.bias"] = (d,)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def test_conversion_stacks_layers_and_transposes_linear_weights():
    config = _tiny_config()
    tensors = _tiny_tensors(config, np.random.default_rng(0))
    params = checkpoint.bert_params({"bert." + k: v for k, v in tensors.items()}, config)  # prefix stripped
    q = tensors["encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(params["layers"]["qkv_w"][1][:, :8], q.T)
    assert params["layers"]["ffn_in_w"].shape == (2, 8, 16)


def test_conversion_names_missing_and_misshapen_tensors():
    config = _tiny_config()
    tensors = _tiny_tensors(config, np.random.default_rng(0))
    del tensors["encoder.layer.1.output.dense.bias"]
    with pytest.raises(checkpoint.CheckpointError, match="lack 1 of"):
        checkpoint.bert_params(tensors, config)
    tensors = _tiny_tensors(config, np.random.default_rng(0))
    tensors["embeddings.word_embeddings.weight"] = np.zeros((12, 8), np.float32)
    with pytest.raises(checkpoint.CheckpointError, match=r"word_embeddings.weight: shape \(12, 8\)"):
        checkpoint.bert_params(tensors, config)


def test_default_bucketing_follows_the_platform_it_loads_on(minilm, minilm_spec):
    import jax

    from bulkinfer.runtime import Bucketing

    assert minilm_spec.bucketing is None
    expected = Bucketing.for_platform(jax.default_backend()).token_budget
    assert minilm.engine.bucketing.token_budget == max(expected, minilm.max_length)


def test_a_local_compilation_cache_keeps_the_engines_executables(minilm_spec, tmp_path):
    import dataclasses

    from bulkinfer.runtime import executables

    loaded = dataclasses.replace(minilm_spec, compilation_cache_dir=str(tmp_path)).load()
    cache = loaded.engine._executables
    assert cache.directory == tmp_path / executables.SUBDIR
    # The code key names this model's settings and changes with the encoder's source.
    assert "pooling=mean" in cache.code_key and executables.source_digest(
        "bulkinfer.models.text", "bulkinfer.models.bert") in cache.code_key
    assert dataclasses.replace(minilm_spec, compilation_cache_dir=None).load().engine._executables is None


def test_packing_is_on_by_default_for_one_cpu_device(minilm, minilm_spec):
    import dataclasses

    import jax

    assert minilm_spec.packed is None
    assert minilm.engine.packed == (jax.default_backend() == "cpu" and len(jax.local_devices()) == 1)
    assert minilm.engine.compiler_options == {}  # packed batches compile with XLA's own options
    off = dataclasses.replace(minilm_spec, packed=False).load()
    assert not off.engine.packed
    np.testing.assert_allclose(off.embed(["a short text", "and a longer one, with more words in it"]),
                               minilm.embed(["a short text", "and a longer one, with more words in it"]), atol=2e-6)


def test_a_max_length_past_the_position_table_is_named_in_a_warning(caplog):
    import logging

    from bulkinfer import TextEmbedder

    with caplog.at_level(logging.WARNING, logger="bulkinfer.models.text"):
        TextEmbedder.from_name("minilm", max_length=1000)
    assert "max_length 1000 is more than the 512 positions of minilm's position table" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bulkinfer.models.text"):
        TextEmbedder.from_name("minilm", max_length=128)
    assert "max_length" not in caplog.text


def test_a_negative_max_in_flight_fails_when_the_spec_is_made(minilm_spec):
    import dataclasses

    with pytest.raises(ValueError, match="max_in_flight must be >= 0, got -1"):
        dataclasses.replace(minilm_spec, max_in_flight=-1)
