#!/usr/bin/env bash
# The GPU checks of issue 13, in under 8 minutes on one GPU (the device tool's machine):
#   1. the tests marked `gpu` (tests/engine/test_gpu.py), results in bench/results/gpu-tests.xml;
#   2. bench/serve.py on CUDA, bf16, over random-weight models of SmolLM2-135M's and
#      Llama-3.2-1B's shapes (bench/gpu_model.py: nothing can be downloaded there), results in
#      bench/results/gpu-serve-<shape>.json.
# Python packages the GPU image lacks travel as wheels in .whl/ (bench/gpu_wheels.sh fetches them
# here; the device tool's `carry` takes the folder). Set PYTHON to choose the interpreter.
#   bench/gpu.sh                # on the GPU machine, from the repo root
#   FACET_GPU_DRY=1 SERVE_TIMEOUT_S=1800 bench/gpu.sh   # the same steps on CPU, quick sizes (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=bench/results
mkdir -p "$RESULTS"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/facet-site .whl/*.whl
    export PYTHONPATH=/tmp/facet-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [ -n "${FACET_GPU_DRY:-}" ]; then
    SHAPES="smollm2-135m"
    SERVE_ARGS=(--quick --dtype float32)
    TEST_MARK="not gpu"  # no CUDA: run one fast engine test instead, to exercise the step
    TESTS=(tests/engine/test_shared_prefill.py)
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
    SHAPES="smollm2-135m llama-3.2-1b"
    SERVE_ARGS=(--dtype bfloat16 --requests 64 --new-tokens 64 --rounds 2 --scale-adapters 300 --cold-adapters 8)
    TEST_MARK="gpu"
    TESTS=(tests/engine/test_gpu.py)
fi
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m "$TEST_MARK" "${TESTS[@]}" --junitxml="$RESULTS/gpu-tests.xml"
for shape in $SHAPES; do
    model=/tmp/facet-gpu-$shape
    [ -d "$model" ] || "$PY" bench/gpu_model.py --shape "$shape" --out "$model"
    timeout "${SERVE_TIMEOUT_S:-240}" "$PY" bench/serve.py --model "$model" "${SERVE_ARGS[@]}" --out "$RESULTS/gpu-serve-$shape.json"
done
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/gpu-* "$OUT"/; fi  # the device tool brings $OUT back
