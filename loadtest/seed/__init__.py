"""The seed's published benchmark as it was run (``python -m loadtest.compare --preset seed``).

Rebuilt from what is known of the seed's ``benchmark/`` folder (stateful-pool 0.3.2); our own
code, not a copy. Each server is a self-contained FastAPI file, as the seed's were:

* ``server_simple.py``: a model replica per GPU in the server process, ``random.choice`` of a
  replica per request, the forward pass in ``asyncio.to_thread``; no lock, no queue.
* ``server_mp.py``: a process per GPU over a ``multiprocessing.Pipe`` (spawn), a global
  ``asyncio.Semaphore(2 x GPUs)``, a random worker per request, an ``asyncio.Lock`` per pipe.
* ``server_spool.py``: ``SPool`` with one ``async_spawn`` per GPU; a whole request is one task.
* ``server_dp.py``: the baseline users try first: one process, ``torch.nn.DataParallel`` over
  every GPU (the plain model on CPU) behind an ``asyncio.Semaphore(1)``.

``model.py`` is the seed's model (torchvision ``vit_l_16``, random weights after
``torch.manual_seed(42)``, the ImageNet Resize/CenterCrop/Normalize preprocessing),
``serving.py`` what the four servers share (device plan, uvicorn, ``/readyz``), and
``client.py`` the seed's load: a fixed number of requests sent by blocking ``requests``
clients, one process each. ``docs/LOADTEST.md`` maps each point to the seed's run.
"""
