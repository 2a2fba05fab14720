# The GPU inference server: one uvicorn process, one pool worker per visible GPU.
#   docker build -t stateful-pool-server .
#   docker run --gpus all -p 8000:8000 stateful-pool-server
# PyPI's Linux torch wheels bundle CUDA; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit.
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

# The same install as `make install` (Makefile), with the serving extras only. The library
# comes first so that editing app/ does not reinstall torch.
COPY pyproject.toml README.md ./
COPY stateful_pool ./stateful_pool
RUN python -m venv /srv/.venv \
    && /srv/.venv/bin/python -m pip install --no-cache-dir -q -e '.[serve]'
COPY app ./app

USER 10001:10001

ENV HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto
EXPOSE 8000

# Liveness only (200 while loading too); readiness is GET /readyz for the orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]

# Give `docker stop` more than SHUTDOWN_TIMEOUT_S (30 s) to drain: docker stop -t 40.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
