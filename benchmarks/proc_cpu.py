"""CPU time of a process tree from /proc (Linux): who takes the shared cores during a run.

``CpuClock(server_pid)`` reads the server process, its children (the worker processes, as
they are at each reading: a respawned worker's time is counted from its first reading) and
this process (the load generator). ``shares(before, after, seconds)`` gives each one's CPU
as a share of one core.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def children_running(pid: int, marker: bytes) -> list[int]:
    """The children of ``pid`` whose command line holds ``marker`` (``b"api_process"``: the
    API processes of ``API_PROCESSES=N``)."""
    found = []
    for child in children(pid):
        try:
            if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def reading(server_pid: int) -> dict[str, float]:
    """CPU seconds so far: ``load generator``, ``API process``, ``worker PID`` each."""
    times = {"load generator": cpu_seconds(os.getpid()),
             "API process": cpu_seconds(server_pid)}
    for child in children(server_pid):
        times[f"worker {child}"] = cpu_seconds(child)
    return times


def shares(before: dict[str, float], after: dict[str, float], seconds: float
           ) -> dict[str, float]:
    """Each process's CPU over the interval, in cores (1.0: one core all the time); the
    workers also summed as ``workers``."""
    used = {name: (after[name] - before.get(name, after[name])) / seconds for name in after}
    used["workers"] = sum(v for k, v in used.items() if k.startswith("worker "))
    return used


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
