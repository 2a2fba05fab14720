"""Example workers for ``WORKER_CLASS`` (see docs/SERVER.md, "Serving another model")."""
