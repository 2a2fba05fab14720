#!/usr/bin/env bash
# Everything docs/GPU.md asks a GPU to measure, in about 7 minutes on a GPU machine
# (loadtest/gpu_check.py: the bare model at fp32/TF32/bf16/bf16+compile, then the server at
# 64 and 256 users with GPU and Pillow decoding). docs/GPU.md says how to run it there.
#
# A GPU machine may have torch, timm and pillow but not fastapi, uvicorn or locust: when they
# are missing, their wheels are installed from the folder WHEELS (default: .whl at the
# repository root) into /tmp/site. Results go to $OUT when it is set, else
# results/loadtest/gpu-check.
#
#   WHEELS=.whl bash loadtest/gpu_check.sh [python -m loadtest.gpu_check options]
#   SMOKE=1 bash loadtest/gpu_check.sh     # the same steps with vit_tiny on CPU, seconds
#   PRESET=seed bash loadtest/gpu_check.sh # the seed's benchmark as run, trimmed
#   PRESET=compare bash loadtest/gpu_check.sh  # our servers vs the simple and mp baselines
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import fastapi, uvicorn, locust, multipart, pydantic_settings" 2>/dev/null; then
    WHEELS=${WHEELS:-.whl}
    if [ ! -d "$WHEELS" ]; then
        echo "fastapi, uvicorn or locust is missing and there is no wheel folder $WHEELS; " \
             "set WHEELS=" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SMOKE:-0}" = 1 ]; then
    exec "$PYTHON" -m loadtest.gpu_check --smoke --output "${OUT:-results/loadtest/gpu-check-smoke}" "$@"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ "${PRESET:-gpu}" = seed ]; then
    # 4 servers x 3 settings x 3 runs of 64 requests (2,624 images per server and run of
    # all settings; fp32 ViT-L/16 at a few hundred images/s) + 4 ViT-L/16 loads: ~5 minutes.
    exec "$PYTHON" -m loadtest.compare --preset seed --images-per-request 1,8,32 --repeats 3 \
        --output "${OUT:-results/loadtest/seed-trimmed}" "$@"
fi
if [ "${PRESET:-gpu}" = compare ]; then
    # 4 servers x 2 settings x 2 repeats x (15 s + locust start) + 4 ViT-L/16 starts: ~7 min.
    exec "$PYTHON" -m loadtest.compare --preset gpu --images-per-request 1,8 --repeats 2 \
        --duration 15 --raw-batch-sizes 1,32,64,128 \
        --output "${OUT:-results/loadtest/gpu-trimmed}" "$@"
fi
exec "$PYTHON" -m loadtest.gpu_check --output "${OUT:-results/loadtest/gpu-check}" "$@"
