"""The states of a worker and of a task, and which worker transitions are legal.

``WorkerState`` is a ``str`` enum, so ``stats().workers[0].state == "idle"`` keeps working for
code that compares with plain strings (metrics labels, JSON).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class WorkerState(StrEnum):
    STARTING = "starting"      # process started, spawn() running
    IDLE = "idle"              # ready, holds no task
    BUSY = "busy"              # holds one or more tasks
    RESTARTING = "restarting"  # crashed; waiting out its backoff before a respawn
    BACKING_OFF = "backing_off"  # restart budget spent; waits longer, then respawns
    STOPPING = "stopping"      # the pool is shutting down and asked it to stop
    STOPPED = "stopped"        # exited at shutdown
    DEAD = "dead"              # out of service for good (spawn failed, restart budget spent)


# Live: serving now, or coming back on its own (a backing-off worker respawns later).
LIVE_STATES = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY,
                         WorkerState.RESTARTING, WorkerState.BACKING_OFF})


class TaskState(IntEnum):
    QUEUED = 0   # waiting for a worker (cancellable)
    RUNNING = 1  # handed to a worker
    DONE = 2     # its future is resolved, or it was dropped


_W = WorkerState
# Every legal move of a worker. Shutdown may stop a worker from any live state; a failed spawn
# or a spent budget takes one from STARTING or RESTARTING to DEAD, or to BACKING_OFF when the
# pool heals (crash_loop_backoff).
_DOWN = frozenset({_W.RESTARTING, _W.BACKING_OFF, _W.DEAD, _W.STOPPING, _W.STOPPED})
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    _W.STARTING: _DOWN | {_W.IDLE},
    _W.IDLE: _DOWN | {_W.BUSY},
    _W.BUSY: _DOWN | {_W.IDLE},
    _W.RESTARTING: frozenset({_W.STARTING, _W.DEAD, _W.STOPPING, _W.STOPPED}),
    _W.BACKING_OFF: frozenset({_W.STARTING, _W.STOPPING, _W.STOPPED}),
    _W.STOPPING: frozenset({_W.STOPPED, _W.DEAD}),
    _W.STOPPED: frozenset({_W.STOPPED}),
    _W.DEAD: frozenset({_W.DEAD}),
}


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise ``RuntimeError`` for a move the state machine does not allow (a pool bug)."""
    if new is not old and new not in TRANSITIONS[old]:
        raise RuntimeError(f"illegal worker state change {old.value} -> {new.value}")
