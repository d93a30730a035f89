"""Every supported text family against sentence-transformers, and what is refused.

The fixtures are tiny random-weight checkpoints made with transformers + sentence-transformers by
scripts/make_family_fixtures.py (`make fixtures`), with sentence-transformers' embeddings of
tests/fixtures/family_texts.json.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from bulkinfer import TextEmbedder
from bulkinfer.models import bert, checkpoint
from bulkinfer.models.checkpoint import CheckpointError
from bulkinfer.testing import cosine

FIXTURES = Path(__file__).parents[1] / "fixtures"
FAMILIES = ("roberta", "xlm-roberta", "distilbert", "bert-dense")


def model_dir(family: str) -> Path:
    return FIXTURES / family / "model"


@pytest.fixture(scope="module")
def texts():
    return json.loads((FIXTURES / "family_texts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=[(f, packed) for f in FAMILIES for packed in (False, True)],
                ids=lambda p: f"{p[0]}-{'packed' if p[1] else 'padded'}")
def family_model(request):
    """(family, loaded model) through the public path: a directory name, from_name, load, the engine;
    with padded and with packed batches (`TextEmbedder.packed`)."""
    family, packed = request.param
    return family, TextEmbedder.from_name(str(model_dir(family)), packed=packed).load()


def test_embeddings_match_sentence_transformers(family_model, texts):
    family, model = family_model
    expected = np.load(FIXTURES / family / "reference.npy")
    got = model.embed(texts)
    assert got.shape == expected.shape and got.dtype == np.float32
    # Measured on this machine (float32): min cosine >= 0.9999997, max |diff| <= 2.7e-6 (xlm-roberta).
    assert cosine(got, expected).min() >= 0.99999
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_fixture_texts_are_truncated_and_distinct(family_model, texts):
    family, model = family_model
    lengths = [len(e.ids) for e in model.tokenizer.encode_batch(texts)]
    assert model.max_length == 64 and max(lengths) == 64 and sum(n == 64 for n in lengths) >= 5
    assert "" in texts and "<pad>" in texts
    expected = np.load(FIXTURES / family / "reference.npy")
    sims = cosine(expected[:, None], expected[None])  # [N, N]
    assert np.median(sims[np.triu_indices(len(texts), 1)]) < 0.95  # texts do not collapse onto one vector


def test_dense_module_sets_the_output_width():
    model = TextEmbedder.from_name(str(model_dir("bert-dense"))).load()
    assert model.dim == 16  # Dense 32 -> 16; the encoder's hidden size is 32
    assert model.embed([]).shape == (0, 16)
    np.testing.assert_allclose(np.linalg.norm(model.embed(["Hello", "world"]), axis=1), 1.0, rtol=1e-5)


def test_roberta_positions_start_after_the_padding_index(texts):
    """The fixtures catch BERT-style positions: the same weights with positions 0..L-1 disagree."""
    for family, padding_idx in (("roberta", 0), ("xlm-roberta", 1)):
        directory = model_dir(family)
        config = checkpoint.read_config(directory)
        assert config.padding_idx == padding_idx and config.max_tokens == 64
        settings = checkpoint.sentence_settings(directory, config)
        params = checkpoint.bert_params(checkpoint.read_safetensors(directory), config)
        tok = checkpoint.load_tokenizer(directory, settings.max_length)
        ids = np.full((len(texts), 64), padding_idx, np.int32)
        mask = np.zeros_like(ids)
        for i, e in enumerate(tok.encode_batch(texts)):
            ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
        kw = dict(pooling=settings.pooling, normalize=settings.normalize)
        bert_style = bert.embed(params, ids, mask, config=dataclasses.replace(config, padding_idx=None), **kw)
        expected = np.load(FIXTURES / family / "reference.npy")
        np.testing.assert_allclose(bert.embed(params, ids, mask, config=config, **kw), expected, atol=1e-5)
        assert cosine(np.asarray(bert_style), expected).min() < 0.9


def test_position_ids_follow_hf_create_position_ids_from_input_ids():
    # HF: mask = ids != pad; positions = cumsum(mask) * mask + pad.  pad = 1; the 5th slot is the engine's padding.
    ids = np.array([[0, 5, 1, 7, 1]], np.int32)  # a literal <pad> token at index 2 stays at position 1
    mask = np.array([[1, 1, 1, 1, 0]], np.int32)
    table = np.arange(8, dtype=np.float32)[:, None]  # position p embeds to [p]
    config = bert.BertConfig(vocab_size=8, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=4,
                             max_position=8, family="roberta", padding_idx=1)
    np.testing.assert_array_equal(bert._positions(table, ids, mask, config)[0, :, 0], [2, 3, 1, 4, 1])


@pytest.mark.parametrize("family", ["distilbert", "bert-dense"])
def test_do_lower_case_is_honoured(family, texts):
    """distilbert: tokenizer_config.json's do_lower_case over a non-lowercasing tokenizer.json;
    bert-dense: sentence_bert_config.json's do_lower_case over a cased tokenizer.  The reference
    embeddings (sentence-transformers) are lowercased; without it the ids differ on cased texts."""
    directory = model_dir(family)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = checkpoint.load_tokenizer(directory, 64)
    raw.enable_truncation(max_length=64)
    differ = [t for t in texts if raw.encode(t).ids != ours.encode(t).ids]
    assert "HeLLo WoRLD, HELLO world" in differ and "hello world" not in differ
    assert ours.encode("HELLO World").ids == ours.encode("hello world").ids


def test_lowercase_is_not_added_twice():
    # MiniLM: tokenizer.json lowercases and the sentence-transformers config says do_lower_case: false.
    minilm = TextEmbedder.from_name("minilm")
    tok = checkpoint.load_tokenizer(Path(minilm.path), 256)
    assert json.loads(tok.normalizer.__getstate__())["type"] == "BertNormalizer"


# ----------------------------------------------------------------------------------------- refusals


def copy_model(family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir(family), tmp_path / family))


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("model_type", ["t5", "mpnet", None])
def test_unsupported_model_type_is_refused_at_from_name(tmp_path, model_type):
    directory = copy_model("roberta", tmp_path)
    edit_json(directory / "config.json", model_type=model_type)
    with pytest.raises(CheckpointError) as err:
        TextEmbedder.from_name(str(directory))
    message = str(err.value)
    assert "\n" not in message and f"model_type {model_type!r} is not supported" in message
    assert "bert, roberta, xlm-roberta, distilbert" in message and "config.json" in message


def test_relative_position_embeddings_are_refused(tmp_path):
    directory = copy_model("bert-dense", tmp_path)
    edit_json(directory / "config.json", position_embedding_type="relative_key")
    with pytest.raises(CheckpointError, match="position_embedding_type 'relative_key' is not supported"):
        TextEmbedder.from_name(str(directory))


def rewrite_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("family,tensor", [
    ("distilbert", "transformer.layer.1.ffn.lin2.bias"),
    ("roberta", "encoder.layer.0.attention.self.key.weight"),
])
def test_missing_tensor_is_refused_naming_it(tmp_path, family, tensor):
    directory = copy_model(family, tmp_path)
    rewrite_weights(directory, lambda t: t.pop(tensor))
    with pytest.raises(CheckpointError, match=f"lack 1 of .*'{tensor}'"):
        TextEmbedder.from_name(str(directory))


def test_misshaped_tensor_is_refused_naming_it(tmp_path):
    directory = copy_model("distilbert", tmp_path)
    name = "transformer.layer.0.ffn.lin1.weight"  # [48, 32]

    def transpose(t):
        t[name] = np.ascontiguousarray(t[name].T)

    rewrite_weights(directory, transpose)
    with pytest.raises(CheckpointError, match=rf"{name}: shape \(32, 48\), config implies \(48, 32\)"):
        TextEmbedder.from_name(str(directory))


def test_unexpected_tensor_is_refused(tmp_path):
    directory = copy_model("xlm-roberta", tmp_path)
    rewrite_weights(directory, lambda t: t.update({"encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"1 tensors config.json does not imply .*encoder.layer.2"):
        TextEmbedder.from_name(str(directory))


def test_misshaped_dense_tensor_is_refused_naming_it(tmp_path):
    directory = copy_model("bert-dense", tmp_path)
    path = directory / "2_Dense" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["linear.bias"] = np.zeros(17, np.float32)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"Dense tensor linear.bias: shape \(17,\), config.json implies \(16,\)"):
        TextEmbedder.from_name(str(directory))


def test_dense_without_safetensors_is_refused(tmp_path):
    directory = copy_model("bert-dense", tmp_path)
    (directory / "2_Dense" / "model.safetensors").rename(directory / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only in pytorch_model.bin; bulkinfer reads safetensors"):
        TextEmbedder.from_name(str(directory))


def test_unknown_dense_activation_is_refused(tmp_path):
    directory = copy_model("bert-dense", tmp_path)
    edit_json(directory / "2_Dense" / "config.json", activation_function="mypackage.Swish")
    with pytest.raises(CheckpointError, match="activation_function 'mypackage.Swish' is not supported"):
        TextEmbedder.from_name(str(directory))


def test_unsupported_module_pipeline_is_refused(tmp_path):
    directory = copy_model("roberta", tmp_path)
    modules = json.loads((directory / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm",
                    "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"})
    (directory / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match=r"modules \['Transformer', 'Pooling', 'LayerNorm'\] are not supported"):
        TextEmbedder.from_name(str(directory))


def test_pooling_needs_exactly_one_mode(tmp_path):
    directory = copy_model("roberta", tmp_path)
    edit_json(directory / "1_Pooling" / "config.json", pooling_mode=["mean", "max"])
    with pytest.raises(CheckpointError, match=r"pooling \['mean', 'max'\] is not supported"):
        TextEmbedder.from_name(str(directory))
