# The GPU inference server: one uvicorn process, one pool worker per visible GPU.
#   docker build -t stateful-pool-server .
#   docker build --build-arg BAKE_WEIGHTS=vit_large_patch16_224 -t stateful-pool-server .
#   docker run --gpus all -p 8000:8000 stateful-pool-server
# torch is PyPI's Linux wheel pinned in constraints.txt, the CUDA 13.0 build: the host needs
# only an NVIDIA driver for CUDA 13.0 and the NVIDIA container toolkit.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/srv/.venv/bin:$PATH \
    HF_HOME=/home/app/.cache/huggingface

WORKDIR /srv

# Numeric ids, so that runtimes enforcing runAsNonRoot can verify the user.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app

# The pinned dependencies first (the constraints file `make install` uses), so that editing
# the code does not reinstall torch; then the project itself, not editable.
COPY constraints.txt ./
RUN python -m venv /srv/.venv \
    && /srv/.venv/bin/python -m pip install --no-cache-dir -q -r constraints.txt
COPY pyproject.toml README.md ./
COPY stateful_pool ./stateful_pool
COPY app ./app
RUN /srv/.venv/bin/python -m pip install --no-cache-dir -q -c constraints.txt \
        '.[serve,llm,otel,interactive]' \
    && rm -rf stateful_pool app

USER 10001:10001

# For air-gapped clusters: bake the pretrained weights of this model into the image.
ARG BAKE_WEIGHTS=""
RUN if [ -n "$BAKE_WEIGHTS" ]; then MODEL_NAME="$BAKE_WEIGHTS" spool-serve --download-weights; fi

# Never serve random weights silently: start-up fails when the pretrained weights cannot be
# loaded (hub unreachable and nothing baked). MODEL_WEIGHTS=random (or auto, which falls back
# with a warning) is the operator's explicit choice; /readyz and /metrics then say so.
# SHUTDOWN_TIMEOUT_S bounds the HTTP drain and then the workers' stop: 2 x 4 s stays within
# `docker stop`'s default 10 s (deploy/ sets 10 s against a 30 s grace period).
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto \
    MODEL_WEIGHTS=pretrained \
    SHUTDOWN_TIMEOUT_S=4
EXPOSE 8000

# Liveness only (200 while loading too); readiness is GET /readyz for the orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]

STOPSIGNAL SIGTERM
CMD ["spool-serve"]
