"""Worker classes used by the library tests. Module level, so spawned workers can import them."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections import namedtuple

from stateful_pool import SWorker

Pair = namedtuple("Pair", "a b")


class Echo(SWorker):
    """Returns what it is given; remembers how many tasks it ran (state lives on)."""

    def spawn(self, tag="echo"):
        self.tag = tag
        self.count = 0
        return {"tag": tag, "pid": os.getpid()}

    def execute(self, x=None, **kwargs):
        self.count += 1
        if kwargs:
            return (x, kwargs)
        return x

    # helpers reachable through execute-by-name tasks below
    def counter(self):
        return self.count


class Tasks(SWorker):
    """Runs a named action: execute("name", *args). One worker class for most fault tests."""

    def spawn(self, tag=None, marker_dir=None):
        self.tag = tag
        self.count = 0
        self.marker_dir = marker_dir
        return os.getpid()

    def execute(self, action, *args):
        self.count += 1
        return getattr(self, "do_" + action)(*args)

    def do_echo(self, x):
        return x

    def do_pid(self):
        return os.getpid()

    def do_count(self):
        return self.count

    def do_sleep(self, seconds, value=None):
        time.sleep(seconds)
        return value

    def do_started_at(self, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        return start

    def do_mark(self, name, seconds=0.0):
        """Leave a file behind (proof the task ran), then optionally sleep."""
        with open(os.path.join(self.marker_dir, name), "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return name

    def do_raise(self, message):
        raise ValueError(message)

    def do_exit(self, code, _ballast=None):
        os._exit(code)

    def do_sigkill(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def do_segfault(self):
        ctypes.string_at(0)

    def do_sleep_then_exit(self, seconds):
        time.sleep(seconds)
        os._exit(6)

    def do_mark_then_exit(self, name):
        self.do_mark(name)
        os._exit(3)

    def do_unpicklable_result(self):
        return threading.Lock()

    def do_raise_unpicklable(self):
        raise UnpicklableError("carries a lock", threading.Lock())

    def do_raise_unrebuildable(self):
        raise NeedsTwoArgs("first", "second")

    def do_unrebuildable_result(self):
        return Unloadable()


class UnpicklableError(Exception):
    def __init__(self, message, lock):
        super().__init__(message)
        self.lock = lock


class NeedsTwoArgs(Exception):
    """Pickles fine, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a, self.b = a, b


def _fail_on_load():
    raise RuntimeError("this object refuses to be rebuilt")


class Unloadable:
    def __reduce__(self):
        return (_fail_on_load, ())


class SpawnRaises(SWorker):
    def spawn(self):
        raise KeyError("no such model")

    def execute(self, x):
        return x


class SpawnDies(SWorker):
    def spawn(self):
        os._exit(9)

    def execute(self, x):
        return x


class SpawnHangs(SWorker):
    def spawn(self, seconds=60):
        time.sleep(seconds)

    def execute(self, x):
        return x


class Batcher(SWorker):
    """execute_batch records the batch sizes it saw; items are ("echo", x) or faults."""

    def spawn(self, cost_s=0.0):
        self.cost_s = cost_s
        self.sizes = []
        return os.getpid()

    def execute(self, item):
        return self.execute_batch([item])[0]

    def execute_batch(self, batch):
        self.sizes.append(len(batch))
        if self.cost_s and any(kind != "sizes" for kind, _ in batch):
            time.sleep(self.cost_s)
        out = []
        for kind, value in batch:
            if kind == "sizes":
                out.append(list(self.sizes))
            elif kind == "raise_all":
                raise ValueError(f"batch failed on {value}")
            elif kind == "wrong_length":
                return out
            elif kind == "bad_item":
                out.append(ValueError(f"bad item {value}"))
            elif kind == "crash":
                os._exit(4)
            else:
                out.append((value, os.getpid()))
        return out


class Contextual(SWorker):
    """Returns what ``current_contexts()`` says while it runs (single tasks and batches)."""

    def execute(self, x):
        from stateful_pool import current_contexts

        return x, current_contexts()

    def execute_batch(self, batch):
        from stateful_pool import current_contexts

        contexts = current_contexts()
        return [(x, contexts[i], len(contexts)) for i, x in enumerate(batch)]


def check_work_conserving(pool, shorts: int, long_s: float, wait_s: float) -> None:
    """With two workers, one long task must not hold up the short ones queued behind it:
    the free worker takes them all (within ``wait_s``) while the other is busy. The same
    contract on every backend."""
    long = pool.submit_execute("sleep", long_s, "long")
    quick = [pool.submit_execute("sleep", 0.05, i) for i in range(shorts)]
    assert [f.result(timeout=wait_s) for f in quick] == list(range(shorts))
    assert not long.done()
    assert long.result(timeout=long_s + 10) == "long"
