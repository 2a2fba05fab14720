"""The FastAPI inference-server template built on ``stateful_pool``.

Where things are:

* what a worker file imports (public): ``contract`` (``ModelWorker``, ``WorkerConfig``,
  ``ImageFile``: the contract, and what crosses the process boundary), ``images`` (upload
  checks, decoding), ``weights`` (``MODEL_WEIGHTS``), ``runtime`` (torch set-up in a worker),
  ``device_images`` (decoding on the GPU);
* ``examples/``: the models, one file each; ``vit`` is the default (``app.worker:ViTWorker``);
* ``serving/``: the serving core, no web framework: one request path for every protocol
  (``core``), the worker's declaration, serving errors and load shedding, a request's
  lifetime, the pool's state and lifespan, the worker plan, Ray;
* ``protocols/``: the wire formats around the core, one module each (``predict``, ``v2``),
  the server's own routes (``probes``), and what they share (``http``);
* ``ops/``: logs, metrics, tracing, middleware;
* ``main`` (``create_app``), ``settings`` (the environment), ``__main__`` (``python -m app``,
  ``spool-serve``), ``healthcheck`` (the container's health probe).

Run it with ``python -m app``; serve another model with ``WORKER_CLASS``
(docs/SERVE_YOUR_MODEL.md).
"""
