"""Workers as Ray actors: the second transport behind the dispatcher's seam.

Each worker is one Ray actor that hosts the user's ``SWorker`` (spawn once, then ``execute``
/ ``execute_batch``) with the very functions a local worker process runs
(``_runner.spawn_worker`` and ``_runner.run_message``). On the parent side the dispatcher
still talks to a local pipe and watches a local fd, exactly as for a process::

    dispatcher <-- socketpair --> relay thread --actor.run.remote()--> Ray actor (anywhere)
    dispatcher <-- sentinel fd <-- watch thread (ray.get(actor.watch.remote()) raises when
                                   the actor dies, busy or idle)

One relay and one watch thread per *worker*, never per task: the relay forwards the one
message a worker holds at a time. A dead actor therefore looks like a dead process: its
sentinel fires, its tasks fail with ``WorkerCrashedError`` and the pool respawns it (as a new
actor) under the same restart budget.

A stream is a Ray streaming generator (``num_returns="streaming"``): the actor yields each
chunk as soon as it is made and the relay forwards it as a CHUNKS message. While a stream
runs, a control thread of the relay reads the dispatcher's CREDIT and CANCEL: the relay stops
taking chunks once ``window`` are unconsumed (and Ray's generator backpressure then pauses
the actor's generator at that many), and a CANCEL reaches the actor through a method of its
own concurrency group, so the generator is closed at its next yield. On Ray a worker runs one
stream at a time (``stream_step`` batches of one).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import _messages as m
from . import _outcomes as o
from ._classref import is_importable
from ._runner import run_message, spawn_worker
from ._stream_worker import drive_stream

logger = logging.getLogger("stateful_pool")


# Ray's stubs do not know concurrency_groups (a documented actor option).
@ray.remote(max_restarts=0, concurrency_groups={"work": 1, "watch": 1, "control": 1})
class StatefulPoolActor:
    """Hosts one SWorker. Runs in a Ray worker process."""

    def __init__(self, worker_cls: type, by_value: bool = False) -> None:
        self._cls = worker_cls
        self._host: Any = None
        self._cancelled: set[int] = set()
        # Results and exceptions of types defined beside a class sent by value cross too.
        self._dumps = ray.cloudpickle.dumps if by_value else pickle.dumps

    @ray.method(concurrency_group="work")
    def spawn(self, payload: bytes) -> tuple[o.Outcome, int, dict[str, Any]]:
        self._host, outcome = spawn_worker(self._cls, payload, self._dumps)
        ctx = ray.get_runtime_context()
        location = {"host": ray.util.get_node_ip_address(),
                    "node": ctx.get_node_id(),
                    "gpu_ids": [int(g) for g in ray.get_gpu_ids()]}
        return outcome, os.getpid(), location

    @ray.method(concurrency_group="work")
    def run(self, message: m.Message) -> list[tuple[int, o.Outcome]]:
        return run_message(self._host, message)

    @ray.method(concurrency_group="work", num_returns="streaming")
    def run_stream(self, message: m.Message) -> Iterator[tuple[bool, Any]]:
        task_id = message.ids[0]
        try:
            yield from drive_stream(self._host, message, lambda: task_id in self._cancelled)
        finally:
            self._cancelled.discard(task_id)

    @ray.method(concurrency_group="control")
    def cancel(self, task_id: int) -> None:
        self._cancelled.add(task_id)

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never returns: the caller's ``ray.get`` raises when this actor dies."""
        threading.Event().wait()


class RayWorkerHandle:
    """Looks like ``multiprocessing.Process`` to the dispatcher; stands for one actor."""

    def __init__(self, actor: Any, worker_id: int) -> None:
        self.actor = actor
        self.pid: int | None = None
        self.location: dict[str, Any] = {}
        self.exitcode: int | None = None
        self.death_cause: str | None = None
        self._killed = False
        self._dead = threading.Event()
        self._sentinel_r, self._sentinel_w = os.pipe()
        self.sentinel = self._sentinel_r
        weakref.finalize(self, _close_quietly, self._sentinel_r)
        self.name = f"stateful_pool-ray-worker-{worker_id}"

    def mark_dead(self, exitcode: int | None, cause: str | None) -> None:
        """Record the actor's end once; the sentinel fd becomes readable (EOF)."""
        if self._dead.is_set():
            return
        if self._killed:
            exitcode, cause = -9, None  # we killed it: reads as SIGKILL, like a process
        self.exitcode, self.death_cause = exitcode, cause
        self._dead.set()
        os.close(self._sentinel_w)

    def join(self, timeout: float | None = None) -> None:
        self._dead.wait(timeout)

    def kill(self) -> None:
        self._killed = True
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            logger.debug("ray.kill failed for %s", self.name, exc_info=True)



def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class RayTransport:
    """Starts workers as Ray actors on the cluster at ``RAY_ADDRESS`` (or a local one)."""

    name = "ray"
    # Options that go to ``ActorClass.options()`` as they are.
    ACTOR_OPTIONS = frozenset({"num_cpus", "num_gpus", "resources", "memory", "runtime_env",
                               "accelerator_type", "name", "namespace", "lifetime",
                               "scheduling_strategy", "label_selector"})

    def __init__(self) -> None:
        self._by_value: dict[type, bool] = {}
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or None
            logger.info("connecting to Ray at %s", address or "a new local instance")
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - self.ACTOR_OPTIONS - {"node_id"}
        if unknown:
            raise ValueError(f"unknown Ray worker options {sorted(unknown)}; valid: "
                             f"{sorted(self.ACTOR_OPTIONS | {'node_id'})}")

    def check_class(self, worker_cls: type) -> Any:
        """Ray sends the class itself, by value when it must. When an actor cannot import the
        class's module (``__main__`` of a script or notebook, a class inside a function), the
        tasks' arguments, results and errors go by value too, with Ray's own cloudpickle: the
        one that sent the class, so the types defined beside it come back as the caller's
        very classes."""
        by_value = worker_cls.__module__ == "__main__" or not is_importable(worker_cls)
        self._by_value[worker_cls] = by_value
        return ray.cloudpickle.dumps if by_value else None

    def start(self, worker_cls: type, worker_id: int, options: dict[str, Any]
              ) -> tuple[Any, RayWorkerHandle]:
        actor_options = {k: v for k, v in options.items() if k != "node_id"}
        if options.get("node_id"):
            actor_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=options["node_id"], soft=False)
        actor = StatefulPoolActor.options(  # type: ignore[attr-defined]
            **actor_options).remote(worker_cls, self._by_value.get(worker_cls, False))
        handle = RayWorkerHandle(actor, worker_id)
        from multiprocessing.connection import Connection

        parent_sock, relay_sock = socket.socketpair()
        parent_conn = Connection(parent_sock.detach())
        relay_conn = Connection(relay_sock.detach())
        threading.Thread(target=_relay, args=(relay_conn, handle), daemon=True,
                         name=f"{handle.name}-relay").start()
        threading.Thread(target=_watch, args=(handle,), daemon=True,
                         name=f"{handle.name}-watch").start()
        return parent_conn, handle


def _watch(handle: RayWorkerHandle) -> None:
    """Notice the actor's death even while it is idle."""
    try:
        ray.get(handle.actor.watch.remote())
    except RayActorError as exc:
        handle.mark_dead(1, _cause(exc))
    except Exception as exc:  # Ray itself went away
        handle.mark_dead(1, f"the Ray actor was lost: {exc!r}")


def _relay(conn: Any, handle: RayWorkerHandle) -> None:
    """Forward the dispatcher's messages to the actor and its answers back."""
    actor = handle.actor
    try:
        blobs = m.recv_message(conn.recv_bytes).blobs
        assert blobs is not None
        outcome, handle.pid, handle.location = ray.get(actor.spawn.remote(blobs[0]))
        o.send_outcomes(conn.send_bytes, m.Kind.SPAWNED, [(0, outcome)])
        if not outcome[0]:  # spawn() raised: the actor goes, as a worker process would
            handle.kill()
            handle.mark_dead(1, "spawn failed")
            return
        backlog: deque[m.Message] = deque()  # what arrived while a stream ran
        while True:
            message = backlog.popleft() if backlog else m.recv_message(conn.recv_bytes)
            kind = message.kind
            if kind == m.Kind.STREAM:
                _relay_stream(conn, actor, message, backlog)
                continue
            if kind == m.Kind.STOP:
                ray.kill(actor, no_restart=True)
                handle.mark_dead(0, None)
                return
            if kind != m.Kind.EXEC and kind != m.Kind.BATCH:
                continue  # CREDIT or CANCEL for a stream that has ended
            reply = ray.get(actor.run.remote(message))
            o.send_outcomes(conn.send_bytes, m.Kind.RESULTS, reply)
    except (EOFError, OSError):
        handle.kill()  # the dispatcher closed the pipe: this worker is done with
        handle.mark_dead(-9, None)
    except RayActorError as exc:
        handle.mark_dead(1, _cause(exc))
    except Exception as exc:
        logger.exception("relay of %s failed", handle.name)
        handle.kill()
        handle.mark_dead(1, f"the relay to the Ray actor failed: {exc!r}")
    finally:
        conn.close()


def _relay_stream(conn: Any, actor: Any, message: m.Message, backlog: deque[m.Message]
                  ) -> None:
    """Forward one stream's chunks, and the dispatcher's CREDIT and CANCEL for it."""
    task_id = message.ids[0]
    window = message.metas[0] if message.metas else 64
    chunks = actor.run_stream.options(_generator_backpressure_num_objects=window).remote(message)
    flow = threading.Condition()
    unread = [0]
    ended = threading.Event()

    def control() -> None:
        while not ended.is_set():
            try:
                if not conn.poll(0.01):
                    continue
                news = m.recv_message(conn.recv_bytes)
            except (EOFError, OSError):
                return  # the dispatcher closed the pipe: the worker is being reaped
            if news.kind == m.Kind.CANCEL or news.kind == m.Kind.CREDIT:
                if news.ids[0] != task_id:
                    continue  # for a stream that has ended
                with flow:
                    if news.kind == m.Kind.CANCEL:
                        actor.cancel.remote(task_id)
                        unread[0] = -(1 << 62)  # take what comes until the end
                    else:
                        assert news.metas is not None
                        unread[0] -= news.metas[0]
                    flow.notify()
            else:
                backlog.append(news)

    thread = threading.Thread(target=control, daemon=True, name="stateful_pool-ray-control")
    thread.start()
    try:
        for ref in chunks:
            is_chunk, value = ray.get(ref)
            if not is_chunk:
                o.send_outcomes(conn.send_bytes, m.Kind.RESULTS, [(task_id, value)])
                continue
            m.send_message(conn.send_bytes, m.Kind.CHUNKS, [task_id], None, None, value)
            with flow:
                unread[0] += len(value)
                while unread[0] >= window and not ended.is_set():
                    flow.wait(0.1)
    finally:
        ended.set()
        thread.join()


def _cause(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the Ray actor died ({type(exc).__name__}: {first[:200]})"
