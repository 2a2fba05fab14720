"""Example workers for ``WORKER_CLASS`` (see README.md, "Serving another model")."""
