"""What the built-in smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF) answers to ten short questions with known
answers, greedy, through bulkinfer's loader and decoder (the README's quality note cites this):

    JAX_PLATFORMS=cpu .venv/bin/python scripts/smollm2_quality.py

Prints each question, the expected word, the completion (up to 40 new tokens) and whether the expected word
appears in it (case-insensitive), then the count.  A crude check, but a true one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bulkinfer.models import decoder
from bulkinfer.models.lm import LanguageModel

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many days are in a week?", "seven|7"),
    ("What is 7 times 8?", "56"),
    ("What is 123 + 456?", "579"),
    ("At what temperature in Celsius does water boil at sea level?", "100"),
    ("Translate 'thank you' into French.", "merci"),
    ("Which author wrote the novel 1984?", "Orwell"),
]
NEW_TOKENS, MAX_LEN, BUCKET = 40, 128, 64


def main() -> None:
    lm = LanguageModel.from_name("smollm2").load()
    forward = jax.jit(decoder.forward, static_argnames="config")
    slots = len(QUESTIONS)
    cache = decoder.init_cache(lm.config, slots=slots, max_len=MAX_LEN)
    prompts = [lm.encode(lm.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q, _ in QUESTIONS]
    nxt, pos = [], []
    for slot, ids in enumerate(prompts):  # one prefill per prompt, padded to one shape
        pad = BUCKET - len(ids)
        logits, cache = forward(lm.params, jnp.asarray([ids + [0] * pad], jnp.int32),
                                jnp.asarray([list(range(len(ids))) + [-1] * pad], jnp.int32), cache,
                                jnp.asarray([slot], jnp.int32), config=lm.config)
        nxt.append(int(np.argmax(logits[0, len(ids) - 1])))
        pos.append(len(ids))
    outs = [[t] for t in nxt]
    done = [t in lm.eos_token_ids for t in nxt]
    for _ in range(NEW_TOKENS - 1):  # decode every slot together; finished ones write past the end
        tokens = jnp.asarray([[o[-1]] for o in outs], jnp.int32)
        positions = jnp.asarray([[p if not d else MAX_LEN] for p, d in zip(pos, done)], jnp.int32)
        logits, cache = forward(lm.params, tokens, positions, cache, jnp.arange(slots, dtype=jnp.int32),
                                config=lm.config)
        for i in range(slots):
            if not done[i]:
                outs[i].append(int(np.argmax(logits[i, 0])))
                pos[i] += 1
                done[i] = outs[i][-1] in lm.eos_token_ids
        if all(done):
            break
    right = 0
    for (question, expected), out in zip(QUESTIONS, outs):
        answer = lm.decode(out).strip()
        ok = any(word.lower() in answer.lower() for word in expected.split("|"))
        right += ok
        print(f"| {question} | {expected.split('|')[0]} | {answer!r} | {'yes' if ok else 'no'} |")
    print(f"{right}/{len(QUESTIONS)} completions contain the expected answer")


if __name__ == "__main__":
    main()
