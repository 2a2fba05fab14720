"""The FastAPI inference-server template built on ``stateful_pool``.

Layers: ``contract`` (what a worker file declares; what crosses the process boundary),
``worker`` (the default model; ``examples/`` holds three more, one file each),
``endpoint`` (the inference route derived from the worker's declaration), ``routes`` (probes,
metrics, model info), ``state`` (the pool and the lifespan), ``plan`` (which workers, where),
``main`` (the factory), ``settings`` (environment), ``images`` (upload checks), ``weights``
(``MODEL_WEIGHTS``), ``runtime`` (torch set-up in a worker), ``errors`` (pool errors -> HTTP),
``metrics`` and ``middleware`` (observability). Run it with ``python -m app``; serve another
model with ``WORKER_CLASS`` (docs/SERVE_YOUR_MODEL.md).
"""
