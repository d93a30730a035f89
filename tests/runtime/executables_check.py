"""Run by test_executables.py in a fresh process (the compiled code must come from disk, not from this
process's memory).  Runs a tiny BERT engine over fixed rows and prints one JSON line: how often the
function was traced, the executable cache's hits and misses, and where it saved the outputs.

    python executables_check.py OUT_NPY [--executables DIR] [--jax-cache DIR]
"""

import argparse
import json
import os

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bulkinfer.runtime import Bucketing, Engine  # noqa: E402
from bulkinfer.runtime.executables import ExecutableCache, source_digest  # noqa: E402
from bulkinfer.testing import TINY_BERT_INPUTS, random_token_rows, tiny_bert  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--executables")
parser.add_argument("--jax-cache")
args = parser.parse_args()
if args.jax_cache:
    jax.config.update("jax_compilation_cache_dir", args.jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

fn, params = tiny_bert()
traces = []


def counted(params, batch):
    traces.append(batch["input_ids"].shape)  # runs only while tracing
    return fn(params, batch)


cache = ExecutableCache(args.executables, source_digest("bulkinfer.models.bert")) if args.executables else None
engine = Engine(counted, params, inputs=TINY_BERT_INPUTS, executable_cache=cache,
                bucketing=Bucketing(lengths=(2, 4, 8, 16), token_budget=64, ladder=1))
out = engine.run({"input_ids": random_token_rows(40, max_len=16)})["output"]
np.save(args.out, out)
print(json.dumps({"traces": len(traces), "compiles": engine.stats.compiles, "loads": engine.stats.cache_loads,
                  "hits": cache.hits if cache else None, "misses": cache.misses if cache else None}))
