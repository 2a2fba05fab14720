"""Contestants measured in turn, round after round, and the median of each figure.

Background load on a shared machine drifts (2 cores here, shared with other work): measuring
one side's rounds and then the other's would let a burst fall on one side only. In turn,
a burst spoils one round of every side alike, and the median over rounds drops it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def alternate(contestants: Mapping[str, Callable[[int], T]], rounds: int,
              after_round: Callable[[dict[str, T]], None] | None = None) -> dict[str, list[T]]:
    """Call each contestant with the round number (from 1), in turn, ``rounds`` times.

    Args:
        contestants: name -> one measurement.
        rounds: how many times each is measured.
        after_round: called with each round's results, by name (to print them).

    Returns:
        Each contestant's results, in round order.
    """
    results: dict[str, list[T]] = {name: [] for name in contestants}
    for round_ in range(1, rounds + 1):
        for name, measure in contestants.items():
            results[name].append(measure(round_))
        if after_round is not None:
            after_round({name: runs[-1] for name, runs in results.items()})
    return results


def medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median of each figure over ``runs`` (the figures of the first run)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}
