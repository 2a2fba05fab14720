"""Load tests: the seed's server comparison (simple vs mp vs spool), reproducible in one command.

* ``locustfile.py``: a locust user posting images to ``/predict``; runs against any server.
* ``server_simple.py``, ``server_mp.py``: the seed's two baselines, built on the same model
  code as ``app/`` (``app.worker``), so only the dispatch differs.
* ``server_spool.py``: the same skeleton dispatching through ``SPool`` (for a like-for-like
  code size; the benchmarked spool server is ``app/`` itself).
* ``compare.py``: ``python -m loadtest.compare`` starts each server, drives locust, and writes
  the summary, table and chart.

Nothing here imports locust: it monkey-patches the process for gevent, so it only ever runs
as a subprocess (``python -m locust -f loadtest/locustfile.py``).
"""
