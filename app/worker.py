"""The default model's public path: ``WORKER_CLASS=app.worker:ViTWorker`` (the default).

The worker itself lives with the other example models, in ``app/examples/vit.py``.
"""

from app.examples.vit import (
    Classifications,
    ClassifyRequest,
    ViTWorker,
    hub_unreachable_reason,
)

__all__ = ["ClassifyRequest", "Classifications", "ViTWorker", "hub_unreachable_reason"]
