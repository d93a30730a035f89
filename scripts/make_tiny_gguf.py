"""Tiny random-weight GGUF files and transformers' outputs on them, for tests/models/test_gguf.py.  Run in
the peers' venv (`make fixtures`), never in .venv:

    .venv-bench/bin/python scripts/make_tiny_gguf.py

Two files, written the way llama.cpp's convert_hf_to_gguf.py writes them, with a mix of tensor types
(F32 norms, F16, Q8_0, Q4_1, Q5_0):
- tests/fixtures/tiny-llama.gguf: Llama with GQA (4 query heads, 2 kv heads), q/k rows permuted for
  llama.cpp's RoPE, an untied output matrix, a SentencePiece vocabulary (scores, <0xNN> byte tokens,
  control tokens) with a chat template;
- tests/fixtures/tiny-qwen2.gguf: Qwen2 (q/k/v biases, tied embeddings, no permutation), a byte-level BPE
  vocabulary with tokenizer.ggml.pre = "qwen2".
transformers loads each file back (`from_pretrained(dir, gguf_file=...)`) and its tokenizer ids, prefill
logits and greedy ids (12 new tokens) go to tests/fixtures/tiny_gguf_reference.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TEXTS = ["the cat sat on the mat", "hello world!", "a b c 123", "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces"]
NEW_TOKENS = 12
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "hi", "user", "two", "spaces", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, two control tokens, 256 byte tokens, then letters and word prefixes with scores."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁"] + list("abcdefghijklmnopqrstuvwxyz!?.,")
    for word in WORDS:
        for end in range(1, len(word) + 1):
            for piece in ("▁" + word[:end], word[:end], word[end - 1:end + 1]):
                if piece not in pieces:
                    pieces.append(piece)
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """GPT-2's 256 byte characters, merges spelling the WORDS (with and without a leading space), two
    control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = []
    for word in WORDS:
        for spelled in (word, "Ġ" + word):
            current = spelled[0]
            for ch in spelled[1:]:
                if current + ch not in tokens:
                    merges.append(f"{current} {ch}")
                    tokens.append(current + ch)
                current += ch
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return tokens, merges, types


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half rows -> interleaved pairs)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
TYPES = {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q5_0, "attn_output.weight": Q.F16,
         "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q8_0, "ffn_down.weight": Q.F16}


def write(path: Path, arch: str, model, tokenizer_kv) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokenizer_kv(writer)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": (state["model.embed_tokens.weight"], Q.Q8_0),
               "output_norm.weight": (state["model.norm.weight"], Q.F32)}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = (state["lm_head.weight"], Q.F16)
    for i in range(config.num_hidden_layers):
        for hf, name in GGUF_NAMES.items():
            key = f"model.layers.{i}.{hf}"
            if key not in state:
                continue
            weight = state[key]
            if arch == "llama" and name == "attn_q.weight":
                weight = llama_permute(weight, config.num_attention_heads)
            elif arch == "llama" and name == "attn_k.weight":
                weight = llama_permute(weight, config.num_key_value_heads)
            tensors[f"blk.{i}.{name}"] = (weight, TYPES.get(name, Q.F32))
    for name, (weight, qtype) in tensors.items():
        data = quantize(weight, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference(path: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    texts = [{"text": t, "ids": tokenizer(t).input_ids, "decoded": tokenizer.decode(tokenizer(t).input_ids, skip_special_tokens=True)}
             for t in TEXTS]
    prompts = []
    for text in TEXTS[:3]:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            batch = torch.tensor([ids])
            logits = model(batch).logits[0]
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, min_new_tokens=NEW_TOKENS,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0)
        prompts.append({"ids": ids, "logits": np.round(logits.numpy(), 6).tolist(), "greedy": out[0, len(ids):].tolist()})
    return {"texts": texts, "prompts": prompts}


def main() -> None:
    torch.manual_seed(0)
    tokens, scores, types = sentencepiece_vocab()

    def spm(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)).eval()
    bl_tokens, merges, bl_types = byte_level_vocab()

    def bpe(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(bl_tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(bl_types)
        writer.add_eos_token_id(len(bl_tokens) - 1)
        writer.add_bos_token_id(len(bl_tokens) - 2)
        writer.add_add_bos_token(False)

    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(bl_tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, initializer_range=0.2)).eval()
    out = {"made_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    for arch, model, kv in (("llama", llama, spm), ("qwen2", qwen2, bpe)):
        path = FIXTURES / f"tiny-{arch}.gguf"
        write(path, arch, model, kv)
        out[arch] = reference(path)
        print("wrote", path, path.stat().st_size, "bytes;", [p["greedy"] for p in out[arch]["prompts"]])
    (FIXTURES / "tiny_gguf_reference.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
