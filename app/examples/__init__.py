"""Example workers for ``WORKER_CLASS``, one file each (docs/SERVE_YOUR_MODEL.md)."""
