#!/usr/bin/env bash
# Issue 4, item 7: the gpu preset trimmed to a few minutes, for a GPU machine lent briefly.
#
# Those machines have torch, timm and pillow but no fastapi, uvicorn or locust
# (../shared/ENV.md): their wheels are installed from the shared folder into /tmp/site.
# Then: the bare ViT-L/16 timing, and every server at 1 and 8 images per request, 2 repeats.
# Results go to $OUT (the device runner's output folder) or results/loadtest/gpu-trimmed;
# draw the chart afterwards on a machine with matplotlib: python -m loadtest.report DIR.
#
#   bash loadtest/gpu_check.sh [extra python -m loadtest.compare options]
#   PRESET=seed bash loadtest/gpu_check.sh    # the seed's benchmark as run (issue 15), trimmed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import fastapi, uvicorn, locust, multipart, pydantic_settings" 2>/dev/null; then
    WHEELS=${WHEELS:-}
    for candidate in shared/gpu-wheels ../shared/gpu-wheels /work/shared/gpu-wheels; do
        if [ -z "$WHEELS" ] && [ -d "$candidate" ]; then WHEELS=$candidate; fi
    done
    if [ -z "$WHEELS" ]; then echo "no gpu-wheels folder found; set WHEELS=" >&2; exit 2; fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ "${PRESET:-gpu}" = seed ]; then
    # 4 servers x 3 settings x 3 runs of 64 requests (2,624 images per server and run of
    # all settings; fp32 ViT-L/16 at a few hundred images/s) + 4 ViT-L/16 loads: ~5 minutes.
    exec "$PYTHON" -m loadtest.compare --preset seed --images-per-request 1,8,32 --repeats 3 \
        --output "${OUT:-results/loadtest/seed-trimmed}" "$@"
fi
# 4 servers x 2 settings x 2 repeats x (15 s + locust start) + 4 ViT-L/16 starts: ~7 minutes.
exec "$PYTHON" -m loadtest.compare --preset gpu --images-per-request 1,8 --repeats 2 \
    --duration 15 --raw-batch-sizes 1,32,64,128 --output "${OUT:-results/loadtest/gpu-trimmed}" "$@"
