"""The pure pieces of the dispatcher, with an injected clock: the restart policy and the worker
state machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stateful_pool import WorkerState
from stateful_pool._restart import RestartPolicy
from stateful_pool._states import LIVE_STATES, TRANSITIONS, check_transition


def test_backoff_doubles_within_the_window_and_is_capped():
    policy = RestartPolicy(max_restarts=None, window=60, backoff=0.1, max_delay=1.0)
    delays = []
    for i in range(6):
        delays.append(policy.delay(now=float(i)))
        policy.record(now=float(i))
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.total == 6


def test_budget_is_spent_then_refills_as_the_window_slides():
    policy = RestartPolicy(max_restarts=2, window=10, backoff=0.5)
    policy.record(now=0.0)
    policy.record(now=1.0)
    assert policy.delay(now=2.0) is None  # two respawns within 10 s: give up
    assert policy.delay(now=10.5) == 1.0  # the first fell out of the window: one left
    assert policy.delay(now=11.5) == 0.5  # both fell out: back to the first backoff
    assert policy.recent(now=11.5) == 0


def test_zero_restarts_means_never_respawn():
    assert RestartPolicy(max_restarts=0, window=60, backoff=0.1).delay(now=0.0) is None


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=40),
       st.integers(min_value=0, max_value=6))
def test_never_more_than_the_budget_within_any_window(times, budget):
    """However crashes arrive, the respawns granted within any window stay within budget."""
    policy = RestartPolicy(max_restarts=budget, window=60, backoff=0.1)
    granted = []
    for now in sorted(times):
        if policy.delay(now) is not None:
            policy.record(now)
            granted.append(now)
    for i, start in enumerate(granted):
        within = [t for t in granted[i:] if t - start <= 60]
        assert len(within) <= budget


def test_spent_budget_backs_off_doubling_to_the_cap_when_healing():
    policy = RestartPolicy(max_restarts=2, window=60, backoff=0.1, crash_loop_backoff=5,
                           crash_loop_max_delay=30)
    delays = []
    now = 0.0
    for _ in range(7):
        delay = policy.delay(now)
        assert delay is not None  # never gives up
        delays.append(delay)
        now += delay
        policy.record(now)
    assert delays[:2] == [0.1, 0.2]        # within the budget: the short backoff
    assert delays[2:] == [5, 10, 20, 30, 30]  # past it: the crash-loop back-off, capped


def test_crash_loop_back_off_starts_over_after_a_quiet_window():
    policy = RestartPolicy(max_restarts=1, window=60, backoff=0.1, crash_loop_backoff=5)
    assert policy.delay(0.0) == 0.1
    policy.record(0.0)
    assert policy.delay(1.0) == 5
    policy.record(6.0)
    assert policy.delay(7.0) == 10
    policy.record(17.0)
    # A whole window with no respawn: the next crash is an ordinary one, then the back-off
    # begins again from its first step.
    assert policy.delay(100.0) == 0.1
    policy.record(100.0)
    assert policy.delay(101.0) == 5


def test_without_healing_a_spent_budget_gives_up_and_zero_never_respawns():
    assert RestartPolicy(max_restarts=0, window=60, backoff=0.1,
                         crash_loop_backoff=5).delay(0.0) is None
    policy = RestartPolicy(max_restarts=1, window=60, backoff=0.1)
    policy.record(0.0)
    assert policy.delay(1.0) is None


def test_worker_states_are_strings_for_metrics_and_json():
    assert WorkerState.IDLE == "idle" and f"{WorkerState.BUSY}" == "busy"
    assert {s.value for s in LIVE_STATES} == {"starting", "idle", "busy", "restarting",
                                              "backing_off"}


def test_every_state_has_its_transitions_and_dead_ends_are_final():
    assert set(TRANSITIONS) == set(WorkerState)
    check_transition(WorkerState.BUSY, WorkerState.IDLE)
    check_transition(WorkerState.RESTARTING, WorkerState.STARTING)
    check_transition(WorkerState.BUSY, WorkerState.BACKING_OFF)
    check_transition(WorkerState.BACKING_OFF, WorkerState.STARTING)
    for final in (WorkerState.STOPPED, WorkerState.DEAD):
        for other in set(WorkerState) - {final}:
            with pytest.raises(RuntimeError, match="illegal worker state change"):
                check_transition(final, other)
    with pytest.raises(RuntimeError, match="idle -> starting"):
        check_transition(WorkerState.IDLE, WorkerState.STARTING)
