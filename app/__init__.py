"""The FastAPI inference-server template built on ``stateful_pool``.

Layers: ``settings`` (environment), ``worker`` (the model: the file you copy to serve another
one), ``contract`` (what crosses the process boundary), ``images`` (upload checks),
``routes`` / ``main`` (HTTP; the lifespan owns the pool), ``errors`` (pool errors -> HTTP),
``metrics`` and ``middleware`` (observability). Run it with ``python -m app``.
"""
