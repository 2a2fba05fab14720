"""Client processes of a ``PoolServer`` for ``tests/pool/test_remote.py``: each runs threads
and an event loop calling the same served pool at once. Module level, so that a spawned
process can import it."""

from __future__ import annotations

import asyncio
import threading
import traceback
from typing import Any

from stateful_pool import PoolClient


def threads_and_coroutines(path: str, authkey: bytes, tag: str, threads: int, coroutines: int,
                           calls: int, results: Any) -> None:
    """``threads`` threads and ``coroutines`` coroutines each make ``calls`` echo calls
    through one client; puts ``(tag, wrong answers, calls made, error or None)`` on
    ``results``."""
    try:
        asyncio.run(_both(path, authkey, tag, threads, coroutines, calls, results))
    except BaseException:
        results.put((tag, -1, 0, traceback.format_exc()))


async def _both(path: str, authkey: bytes, tag: str, threads: int, coroutines: int,
                calls: int, results: Any) -> None:
    client = await PoolClient.connect_async(path, authkey)
    pool = client.pool("tasks")
    wrong = 0
    made = 0
    lock = threading.Lock()

    def in_thread(n: int) -> None:
        nonlocal wrong, made
        for i in range(calls):
            value = f"{tag}-t{n}-{i}"
            answer = pool.execute("echo", value)
            with lock:
                made += 1
                wrong += answer != value

    async def in_coroutine(n: int) -> None:
        nonlocal wrong, made
        for i in range(calls):
            value = f"{tag}-c{n}-{i}"
            answer = await pool.async_execute("echo", value)
            made += 1
            wrong += answer != value

    workers = [threading.Thread(target=in_thread, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    await asyncio.gather(*(in_coroutine(n) for n in range(coroutines)))
    for worker in workers:
        await asyncio.to_thread(worker.join, 60)
    client.close()
    results.put((tag, wrong, made, None))
