"""The Ray backend: the same SPool promises with workers as Ray actors.

Runs on a simulated two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
loopback only), started once for this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra stateful-pool[ray]")

from procs import pid_alive, wait_until  # noqa: E402
from workers import Batcher, SpawnRaises, Tasks, check_work_conserving  # noqa: E402

from stateful_pool import (  # noqa: E402
    NoWorkersError,
    PoolClosedError,
    SPool,
    TaskTimeoutError,
    WorkerCrashedError,
)

TESTS = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Actors import the test workers (and this checkout) from the nodes' environment.
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS.parents[1]), str(TESTS)])
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 4, "include_dashboard": False})
    c.add_node(num_cpus=4, resources={"second_node": 1})
    ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


@pytest.fixture
def ray_pool(cluster):
    pools = []

    def make(*args, **kwargs):
        pool = SPool(*args, backend="ray", **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(cancel_futures=True, timeout=10)


def alive_actor_pids() -> set[int]:
    return {a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "StatefulPoolActor" and a["State"] != "DEAD"}


def test_seed_api_futures_and_asyncio(ray_pool):
    pool = ray_pool(Tasks)
    pids = {pool.spawn(), pool.spawn()}
    assert len(pids) == 2
    assert pool.execute("echo", 41) == 41
    futures = [pool.submit_execute("echo", i) for i in range(50)]
    assert [f.result(timeout=30) for f in futures] == list(range(50))

    async def main():
        return await asyncio.gather(*(pool.async_execute("echo", i) for i in range(50)))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == list(range(50))
    assert all(w.tasks_done > 0 for w in pool.stats().workers)


def test_task_exception_keeps_its_type_and_remote_traceback(ray_pool):
    pool = ray_pool(Tasks)
    pool.spawn()
    with pytest.raises(ValueError, match="boom") as info:
        pool.execute("raise", "boom")
    assert "do_raise" in str(info.value.__cause__)
    assert pool.execute("count") == 2  # the worker's state lives on


def test_spawn_exception_comes_back_and_no_actor_is_left(ray_pool):
    pool = ray_pool(SpawnRaises)
    with pytest.raises(KeyError, match="no such model"):
        pool.spawn()
    with pytest.raises(NoWorkersError):
        pool.execute(1)


def test_work_conserving_dispatch(ray_pool):
    pool = ray_pool(Tasks)
    pool.spawn()
    pool.spawn()
    check_work_conserving(pool, shorts=5, long_s=2.0, wait_s=1.8)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_dead_actor_fails_only_its_task_and_is_respawned(ray_pool, how):
    pool = ray_pool(Tasks, restart_backoff=0.05)
    pool.spawn()
    pool.spawn()
    victim = pool.submit_execute("sleep", 30, "never")
    time.sleep(0.5)
    busy = [w for w in pool.stats().workers if w.state == "busy"]
    assert len(busy) == 1
    handle = pool._dispatcher.slots[busy[0].worker_id].process
    if how == "ray.kill":
        ray.kill(handle.actor)
    else:
        os.kill(busy[0].pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError, match="Ray actor died") as info:
        victim.result(timeout=20)
    assert info.value.worker_id == busy[0].worker_id
    # The other worker served meanwhile; the dead one comes back as a new actor.
    assert [pool.execute("echo", i) for i in range(4)] == list(range(4))
    assert wait_until(lambda: pool.stats().restarts == 1 and
                      all(w.state == "idle" for w in pool.stats().workers), timeout=30)
    assert pool.stats().workers[busy[0].worker_id].pid != busy[0].pid


def test_idle_actor_death_is_noticed(ray_pool):
    pool = ray_pool(Tasks, restart_backoff=0.05)
    pool.spawn()
    ray.kill(pool._dispatcher.slots[0].process.actor)
    assert wait_until(lambda: pool.stats().restarts == 1 and
                      pool.stats().workers[0].state == "idle", timeout=30)
    assert pool.execute("echo", "back") == "back"
    assert pool.stats().failed == 0


def test_timeouts_on_ray(ray_pool):
    pool = ray_pool(Tasks, execution_timeout=0.5, hang_timeout=1.5)
    pool.spawn()
    with pytest.raises(TaskTimeoutError):
        pool.execute("sleep", 10)
    # The hung task's actor is killed after hang_timeout and respawned.
    assert wait_until(lambda: pool.stats().restarts == 1, timeout=30)
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=30)
    assert pool.execute("echo", "ok") == "ok"


def test_batching_on_ray(ray_pool):
    pool = ray_pool(Batcher, max_batch_size=8, max_batch_wait=0.1)
    pool.spawn()
    futures = [pool.submit_execute(("echo", i)) for i in range(16)]
    assert [f.result(timeout=30)[0] for f in futures] == list(range(16))
    assert pool.stats().batch_size_max > 1


def test_workers_on_two_nodes_served_through_one_pool(ray_pool):
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    pool = ray_pool(Tasks)
    for node in nodes:
        pool.options(node_id=node).spawn()
    placed = [w.node for w in pool.stats().workers]
    assert sorted(placed) == sorted(nodes)
    assert all(w.host for w in pool.stats().workers)
    futures = [pool.submit_execute("sleep", 0.05, i) for i in range(20)]
    assert [f.result(timeout=30) for f in futures] == list(range(20))
    assert all(w.tasks_done >= 3 for w in pool.stats().workers)


def test_resource_options_reach_ray(ray_pool):
    pool = ray_pool(Tasks, worker_options={"num_cpus": 1})
    pool.options(resources={"second_node": 1}).spawn()
    second = [n["NodeID"] for n in ray.nodes()
              if n["Alive"] and "second_node" in n["Resources"]]
    assert pool.stats().workers[0].node == second[0]
    with pytest.raises(ValueError, match="unknown Ray worker options"):
        pool.options(gpus=1)


def test_shutdown_leaves_no_actor_behind(cluster):
    pool = SPool(Tasks, backend="ray")
    pids = {pool.spawn(), pool.spawn()}
    assert pids <= alive_actor_pids()
    pool.shutdown()
    assert wait_until(lambda: not (pids & alive_actor_pids()), timeout=20)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=20)
    with pytest.raises(PoolClosedError):
        pool.execute("echo", 1)


def test_process_backend_refuses_ray_options():
    with pytest.raises(ValueError, match="process backend takes no per-worker options"):
        SPool(Tasks, worker_options={"num_gpus": 1})
    with pytest.raises(ValueError, match="backend must be 'process' or 'ray'"):
        SPool(Tasks, backend="k8s")


def test_types_defined_beside_a_local_worker_class_cross_both_ways(ray_pool):
    """A worker class the actors cannot import (defined inside a function, as in a notebook
    or a script's __main__): the request, answer and error types defined beside it reach the
    actor and come back as the very classes the caller defined."""
    from dataclasses import dataclass

    from stateful_pool import SWorker

    @dataclass
    class Request:
        text: str

    @dataclass
    class Answer:
        upper: str

    class Refused(Exception):
        pass

    class Upper(SWorker):
        def execute(self, request):
            if not request.text:
                raise Refused("empty text")
            return Answer(request.text.upper())

    pool = ray_pool(Upper)
    pool.spawn()
    answer = pool.execute(Request("cat"))
    assert type(answer) is Answer and answer.upper == "CAT"
    with pytest.raises(Refused, match="empty text"):
        pool.execute(Request(""))


# ---- streams on Ray: the same promises as tests/pool/test_stream.py ------------------------


def test_streams_on_ray_sync_async_and_execute(ray_pool):
    from stream_workers import Streamer

    pool = ray_pool(Streamer, execution_timeout=60)
    pool.spawn()
    assert list(pool.stream("count", 50)) == list(range(50))
    assert pool.execute("count", 3) == [0, 1, 2]

    async def main():
        return [c async for c in pool.async_stream("count", 5)]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [0, 1, 2, 3, 4]


def test_breaking_a_ray_stream_closes_the_generator_and_the_actor_serves_on(ray_pool, tmp_path):
    from stream_workers import Streamer

    pool = ray_pool(Streamer, execution_timeout=60)
    pool.spawn(marker_dir=str(tmp_path))
    for chunk in pool.stream("tracked", "r", 10_000, 0.01):
        if chunk == 3:
            break
    started = time.monotonic()
    report = pool.execute("report", "r")
    assert time.monotonic() - started < 5
    assert report["closed"] is True and report["steps"] < 100
    assert (tmp_path / "r").exists()


def test_ray_stream_faults_come_after_the_chunks(ray_pool):
    from stream_workers import Streamer

    pool = ray_pool(Streamer, execution_timeout=60, restart_backoff=0.05)
    pool.spawn()
    got = []
    with pytest.raises(ValueError, match="failed after 2"):
        for chunk in pool.stream("raise_after", 2):
            got.append(chunk)
    assert got == [0, 1]
    got = []
    with pytest.raises(WorkerCrashedError):
        for chunk in pool.stream("sigkill_after", 3):
            got.append(chunk)
    assert got == [0, 1, 2]
    assert wait_until(lambda: pool.stats().workers[0].state == "idle", timeout=60)
    assert list(pool.stream("count", 2)) == [0, 1]


def test_a_slow_reader_bounds_a_ray_stream(ray_pool, tmp_path):
    from stream_workers import Streamer

    pool = ray_pool(Streamer, execution_timeout=60, stream_buffer=4)
    pool.spawn(marker_dir=str(tmp_path))
    stream = pool.stream("progress", "rp", 10_000)
    for expected in range(10):
        assert next(stream) == expected
        time.sleep(0.05)
    time.sleep(0.5)
    # The relay takes at most stream_buffer unconsumed chunks; Ray's backpressure holds the
    # actor's generator within as many more.
    assert int((tmp_path / "rp").read_text()) <= 10 + 2 * 4 + 2
    stream.close()


def test_stream_step_on_ray_runs_one_stream_at_a_time(ray_pool):
    from stream_workers import StepOnly

    pool = ray_pool(StepOnly, max_batch_size=4, execution_timeout=60)
    pool.spawn(step_s=0.0)
    assert list(pool.stream("s", 3)) == [("s", 0), ("s", 1), ("s", 2)]
    bad = []
    with pytest.raises(ValueError, match="b failed at 1"):
        for chunk in pool.stream("b", 5, 1):
            bad.append(chunk)
    assert bad == [("b", 0)]
