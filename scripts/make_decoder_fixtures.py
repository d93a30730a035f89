"""Write tiny random-weight decoder checkpoints with transformers' prefill logits and greedy completions.

Each checkpoint is an HF directory written by the real `transformers` classes (hidden size 32, 2 layers,
a byte-level BPE of ~300 tokens trained here on a few sentences) and saved with `save_pretrained`, the
way users' checkpoints are.  For each prompt, transformers computes the prefill logits of the prompt and
`generate(do_sample=False, max_new_tokens=16)`.  The tests compare bulkinfer's JAX port against them
without PyTorch.

Outputs (in ``--out-dir``, default tests/fixtures/decoders):

* ``<family>/``: the checkpoint (config.json, *.safetensors, tokenizer.json, tokenizer_config.json,
  generation_config.json, chat_template.jinja where one is set).
* ``<family>/reference.npz``: ``ids_<i>`` int32 [L] the prompt's token ids (transformers' tokenizer),
  ``logits_<i>`` float32 [L, V] the prefill logits, ``greedy_<i>`` int32 [<= 16] the generated ids (fewer when
  the model ends with its EOS).
* ``<family>/reference_chat.json`` (where a chat template is set): transformers' apply_chat_template text
  of a two-message chat, with add_generation_prompt.
* ``prompts.json``: the prompts.

Checkpoints and what each one exercises:

* ``llama``: GQA (4 heads, 2 kv heads), tied embeddings, a BOS added by the tokenizer.
* ``llama-rope-llama3``: untied, rope_scaling llama3 (its three frequency bands all occur at head_dim 8).
* ``llama-rope-dynamic``: dynamic NTK rope_scaling with max_position_embeddings 16, below the longest
  prompt + completion; transformers' rotary state is per model, so each prompt gets a fresh model.
* ``qwen2``: q/k/v biases, linear rope_scaling, a ChatML chat template, weights sharded
  (model.safetensors.index.json).
* ``mistral``: sliding_window 8 (shorter than the longer prompts), head_dim 16 != hidden / heads.
* ``gpt2``: learned positions, LayerNorm, gelu_new, fused c_attn.

Weights are drawn with initializer_range 0.3 (not 0.02), so greedy choices have clear margins; the script
refuses a fixture whose top-2 logit margin anywhere along a greedy path is under 1e-3.

Runs in the peers' venv (``make fixtures``); PyTorch never enters bulkinfer's venv.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

SEED = 0
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 32, 2, 4, 2, 48
NEW_TOKENS = 16
MIN_MARGIN = 1e-3
SPECIALS = ["<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Bulk inference keeps accelerators busy for hours on large datasets.",
    "A language model predicts the next token from the tokens before it.",
    "Prompts of different lengths share one batch through a key-value cache.",
    "Greedy decoding picks the most likely token at every step.",
    "Hello, world! Numbers 0123456789 and punctuation: ;,.?!",
]
PROMPTS = [
    "The",
    "Hello, world!",
    "A language model predicts the next token",
    "Prompts of different lengths share one batch",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(bos: bool):
    """A byte-level BPE (~300 tokens) on CORPUS; with `bos`, the post-processor prepends <s> as Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _llama_like(cls_config, **extra):
    return cls_config(vocab_size=300, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      initializer_range=0.3, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)


def build(family: str):
    """(model, fast tokenizer, whether each prompt needs a fresh model) for one fixture."""
    import torch
    import transformers as tf

    torch.manual_seed(SEED)
    bos = family != "gpt2"
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(bos))
    if family == "gpt2":
        tok.bos_token = tok.eos_token = tok.unk_token = "<|endoftext|>"
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        config = tf.GPT2Config(vocab_size=len(tok), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                               initializer_range=0.3, bos_token_id=eos, eos_token_id=eos)
        model = tf.GPT2LMHeadModel(config)
    else:
        tok.bos_token, tok.eos_token = "<s>", "</s>"
        if family == "llama":
            config = _llama_like(tf.LlamaConfig, tie_word_embeddings=True)
        elif family == "llama-rope-llama3":
            config = _llama_like(tf.LlamaConfig, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, rope_theta=10.0)
        elif family == "llama-rope-dynamic":
            config = _llama_like(tf.LlamaConfig, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
            config.max_position_embeddings = 16
        elif family == "qwen2":
            tok.bos_token, tok.eos_token = None, "<|im_end|>"
            tok.chat_template = CHATML
            config = _llama_like(tf.Qwen2Config, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                 tie_word_embeddings=False)
            config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
            config.bos_token_id = None
        elif family == "mistral":
            config = _llama_like(tf.MistralConfig, sliding_window=8, head_dim=16)
        else:
            raise ValueError(family)
        model = tf.AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    return model, tok


def greedy_margin(scores) -> float:
    """The smallest top-1 minus top-2 logit over the generate() steps."""
    import torch

    top = torch.stack([s[0].float().topk(2).values for s in scores])  # [steps, 2]
    return float((top[:, 0] - top[:, 1]).min())


def write_family(family: str, out: Path) -> None:
    import torch
    import transformers as tf

    directory = out / family
    shutil.rmtree(directory, ignore_errors=True)
    model, tok = build(family)
    shard = {"max_shard_size": "40KB"} if family == "qwen2" else {}
    model.save_pretrained(directory, **shard)
    tok.save_pretrained(directory)
    arrays, margins = {}, []
    for i, prompt in enumerate(PROMPTS):
        if family == "llama-rope-dynamic":  # transformers' dynamic rope keeps state across calls
            model = tf.AutoModelForCausalLM.from_pretrained(directory).float().eval()
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0]
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = gen.sequences[0, ids.shape[1]:]
        margins.append(greedy_margin(gen.scores))
        arrays[f"ids_{i}"] = ids[0].numpy().astype(np.int32)
        arrays[f"logits_{i}"] = logits.numpy().astype(np.float32)
        arrays[f"greedy_{i}"] = new.numpy().astype(np.int32)
    if min(margins) < MIN_MARGIN:
        raise SystemExit(f"{family}: greedy margin {min(margins):.2e} < {MIN_MARGIN}; change SEED")
    np.savez_compressed(directory / "reference.npz", **arrays)
    if tok.chat_template:
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        (directory / "reference_chat.json").write_text(json.dumps({"messages": CHAT, "text": text}, indent=1) + "\n")
    size = sum(p.stat().st_size for p in directory.iterdir())
    print(f"{family}: {size / 1024:.0f} kB, files {sorted(p.name for p in directory.iterdir())}, "
          f"min greedy margin {min(margins):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/decoders")
    parser.add_argument("--families", nargs="*",
                        default=["llama", "llama-rope-llama3", "llama-rope-dynamic", "qwen2", "mistral", "gpt2"])
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "prompts.json").write_text(json.dumps(PROMPTS, indent=1) + "\n")
    for family in args.families:
        write_family(family, args.out_dir)


if __name__ == "__main__":
    main()
