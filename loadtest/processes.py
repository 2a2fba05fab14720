"""Child processes for the benchmarks and load tests: each in a session of its own, its output
in a log file, its whole process group killed when the caller is done with it.

A session of its own makes everything the child starts (a server's model workers, locust's
users, the seed client's processes) findable and killable as one group, even after the child
itself has died. Every wait here has a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this checkout first on
    ``PYTHONPATH``, so a child imports ``app``, ``loadtest`` and ``stateful_pool`` from here
    rather than from wherever the package is installed."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def live_processes() -> Iterator[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every live process, zombies left out (Linux
    /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            yield int(entry), int(parent), int(group)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return [pid for pid, _, group in live_processes() if group == pgid]


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a process group; nothing if it is gone."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextmanager
def logged_process(command: Sequence[str], log_path: Path,
                   env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` started in this checkout, in a session of its own, stdout and stderr to
    ``log_path``. Leaving the block for any reason (a time-out, Ctrl-C, an error) kills
    the whole group and reaps the child: nothing it started outlives the block."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(list(command), cwd=ROOT, env=child_environment(env),
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        kill_group(process.pid)  # start_new_session: the child leads its own group
        process.wait(10)


def run_logged(command: Sequence[str], log_path: Path, timeout: float,
               env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` to its end as ``logged_process`` does; return its exit code.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (its group is killed).
    """
    with logged_process(command, log_path, env) as process:
        return process.wait(timeout)


def log_tail(log_path: Path, lines: int = 15) -> str:
    """The last lines of a log file, or "" if there is none."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
