"""The public surface: what `from stateful_pool import ...` offers, and how it reads."""

from __future__ import annotations

import inspect

import stateful_pool
from stateful_pool import SPool, errors


def test_public_names():
    assert stateful_pool.__all__ == sorted(stateful_pool.__all__)
    assert set(stateful_pool.__all__) == {
        "AsyncChunkStream", "CallOptions", "ChunkStream", "END_OF_STREAM", "Histogram",
        "NoWorkersError", "PoolClient", "PoolClosedError", "PoolError", "PoolServer",
        "PoolStats", "QueueFullError", "RemoteError", "RemotePool", "SPool", "SWorker",
        "ServerGoneError", "SpawnError", "SpawnTimeoutError",
        "TaskState", "TaskTimeoutError", "WorkerCrashedError", "WorkerState", "WorkerStats",
        "current_contexts",
    }
    for name in stateful_pool.__all__:
        assert getattr(stateful_pool, name).__module__ == "stateful_pool", name


def test_error_tree():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.PoolError)
    assert issubclass(errors.TaskTimeoutError, TimeoutError)
    assert issubclass(errors.SpawnTimeoutError, TimeoutError)
    assert issubclass(errors.SpawnTimeoutError, errors.SpawnError)
    assert issubclass(errors.NoWorkersError, RuntimeError)
    assert issubclass(errors.PoolClosedError, RuntimeError)


def test_seed_signature_is_kept():
    params = inspect.signature(SPool.__init__).parameters
    positional = [p.name for p in params.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "worker_cls", "queue_size", "submission_timeout",
                          "execution_timeout", "thread_pool"]
    new = [p for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert new and all(p.default is not inspect.Parameter.empty for p in new)
    # The seed's methods are all there, the async ones as coroutine functions.
    for method in ("spawn", "execute", "submit_spawn", "submit_execute", "shutdown", "stats",
                   "__enter__", "__exit__"):
        assert not inspect.iscoroutinefunction(getattr(SPool, method)), method
    for method in ("async_spawn", "async_execute", "__aenter__", "__aexit__"):
        assert inspect.iscoroutinefunction(getattr(SPool, method)), method
    # Any arguments reach the worker's own spawn and execute.
    for method in ("spawn", "execute", "submit_spawn", "submit_execute", "async_spawn",
                   "async_execute"):
        kinds = [p.kind for p in inspect.signature(getattr(SPool, method)).parameters.values()]
        assert kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
                         inspect.Parameter.VAR_KEYWORD], method


def test_library_has_no_runtime_dependencies_and_ships_py_typed():
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    assert (root / "stateful_pool" / "py.typed").exists()
