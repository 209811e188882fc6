#!/usr/bin/env bash
# Wheels of the packages the GPU image lacks (it has torch, transformers, peft, safetensors, httpx,
# pytest, jinja2, numpy; see the device tool's KINDS.md), for Python 3.12 x86-64, into .whl/
# (git-ignored: add `/.whl/` to .git/info/exclude). bench/gpu.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
for pkg in pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
           pydantic-settings==2.16.3 python-dotenv==1.2.4 pytest-asyncio==1.5.0; do  # as pinned here
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$pkg"
done
ls .whl
