"""Load tests: the server comparison of stateful-pool 0.3.2 ("the seed": simple vs mp vs
spool), reproducible in one command.

``docs/LOADTEST.md`` says what each preset reproduces of the seed's benchmark.

* ``locustfile.py``: a locust user posting images to ``/predict``; runs against any server.
* ``server_simple.py``, ``server_mp.py``: our stricter rebuilds of the seed's two baselines
  (from its README's one-line descriptions), on the same model code as ``app/``
  (``app.worker``), so only the dispatch differs.
* ``server_spool.py``: the same skeleton dispatching through ``SPool`` (for a like-for-like
  code size; the benchmarked spool server is ``app/`` itself).
* ``seed/``: stateful-pool 0.3.2's benchmark as it was run: its four servers (``simple``,
  ``mp``, ``spool`` and the DataParallel ``dp``) on its own model code, and its client (a
  fixed number of requests from blocking ``requests`` clients in processes).
* ``compare.py``: ``python -m loadtest.compare`` starts each server, drives the load (locust,
  or the seed's client with ``--preset seed``), and writes the summary, table and chart;
  ``presets.py`` is its command line and presets, ``session.py`` the servers of one
  comparison and the runs against them.
* ``results.py``: the figures (per run, mean and spread over repeats, code size) and the
  summary files; ``report.py``: the Markdown table, the targets checked and the chart
  (``python -m loadtest.report RESULTS_DIR`` redraws them).
* ``servers.py``, ``processes.py``, ``rounds.py``, ``images.py``, ``raw_model.py``: the
  harness that ``benchmarks/`` and ``tests/`` use too: server subprocesses on a free
  127.0.0.1 port, children in process groups reaped whatever happens, contestants measured
  in turns with medians, generated images and multipart bodies, the bare model's timing.

Nothing here imports locust: it monkey-patches the process for gevent, so it only ever runs
as a subprocess (``python -m locust -f loadtest/locustfile.py``).
"""
