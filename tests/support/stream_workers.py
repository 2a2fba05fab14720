"""Streaming worker classes for the library tests (module level: spawned workers import them).

``Streamer.execute(action, *args)`` calls ``do_<action>``: generator actions stream, plain
ones answer once (a later task reads what an earlier stream left behind)."""

from __future__ import annotations

import os
import signal
import threading
import time

from stateful_pool import END_OF_STREAM, SWorker


class Streamer(SWorker):
    def spawn(self, marker_dir=None):
        self.marker_dir = marker_dir
        self.closed = []  # streams whose generator was closed (its finally ran)
        self.steps = {}  # how many chunks each named stream produced
        return os.getpid()

    def execute(self, action, *args):
        return getattr(self, "do_" + action)(*args)

    def _mark(self, name):
        if self.marker_dir:
            with open(os.path.join(self.marker_dir, name), "a") as f:
                f.write(f"{os.getpid()}\n")

    def do_count(self, n, delay=0.0):
        for i in range(n):
            if delay:
                time.sleep(delay)
            yield i

    def do_tracked(self, name, n, delay=0.0):
        """Counts, records each step and marks its end (finally) on disk and in memory."""
        self.steps[name] = 0
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                self.steps[name] = i + 1
                yield i
        finally:
            self.closed.append(name)
            self._mark(name)

    def do_progress(self, name, n):
        """Counts as fast as it may; writes how far it got to a file at each step."""
        path = os.path.join(self.marker_dir, name)
        for i in range(n):
            with open(path, "w") as f:
                f.write(str(i + 1))
            yield i

    def do_report(self, name):
        return {"closed": name in self.closed, "steps": self.steps.get(name)}

    def do_pid(self):
        return os.getpid()

    def do_raise_after(self, n):
        yield from range(n)
        raise ValueError(f"failed after {n}")

    def do_sigkill_after(self, n):
        yield from range(n)
        time.sleep(0.2)  # the chunks reach the parent before the worker dies
        os.kill(os.getpid(), signal.SIGKILL)
        yield n

    def do_unpicklable_after(self, n):
        yield from range(n)
        yield threading.Lock()
        yield n + 1

    def do_stall_after(self, n, seconds):
        yield from range(n)
        time.sleep(seconds)
        yield n

    def do_not_a_generator(self):
        return 42


class _Steps:
    """Continuous batching with a simulated forward step: each stream counts to ``n``; one
    step advances every active stream by one. Records which streams each step served."""

    def spawn(self, step_s=0.01, marker_dir=None):
        self.step_s = step_s
        self.marker_dir = marker_dir
        self.log = []  # per step: the stream names it served
        self.closed = []
        return os.getpid()

    def stream_open(self, name, n, fail_at=None):
        return {"name": name, "n": n, "i": 0, "fail_at": fail_at}

    def stream_step(self, states):
        if self.step_s:
            time.sleep(self.step_s)
        self.log.append([s["name"] for s in states])
        out = []
        for s in states:
            if s["i"] >= s["n"]:
                out.append(END_OF_STREAM)
            elif s["fail_at"] is not None and s["i"] == s["fail_at"]:
                out.append(ValueError(f"{s['name']} failed at {s['i']}"))
            else:
                out.append((s["name"], s["i"]))
                s["i"] += 1
        return out

    def stream_close(self, state):
        self.closed.append(state["name"])
        if self.marker_dir:
            with open(os.path.join(self.marker_dir, state["name"]), "w") as f:
                f.write(str(state["i"]))


class Stepper(_Steps, SWorker):
    """Streams by ``stream_step``; its own ``execute`` reports what the steps saw."""

    def execute(self, action, *args):
        if action == "log":
            return list(self.log)
        if action == "closed":
            return list(self.closed)
        raise ValueError(action)


class StepOnly(_Steps, SWorker):
    """Streams by ``stream_step`` and defines no ``execute``."""
