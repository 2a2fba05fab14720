"""The tasks' deadlines, soonest first.

A pure unit: no threads and no clock of its own; the dispatcher passes ``now``. Items only
need ``deadline``, ``id`` and ``done()`` (a ``Task``); tests may pass anything like it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class HasDeadline(Protocol):
    id: int
    deadline: float | None

    def done(self) -> bool: ...


T = TypeVar("T", bound=HasDeadline)

# Pruning starts once the heap holds this many entries.
PRUNE_AT = 1024


class Deadlines(Generic[T]):
    """A heap of (deadline, id, item) that does not keep finished items alive.

    An entry stays in a heap until its deadline comes up. With a long timeout that would be
    minutes of traffic, each finished task holding its result; the garbage collector's full
    passes over them showed as 100 ms latency spikes. So ``prune`` drops the finished entries
    once they are the majority (and the heap holds at least ``prune_at``): amortised O(1)
    per item.
    """

    def __init__(self, prune_at: int = PRUNE_AT) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._prune_at = prune_at

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: T) -> None:
        assert item.deadline is not None
        heapq.heappush(self._heap, (item.deadline, item.id, item))

    def next_at(self) -> float | None:
        """The soonest deadline (of an item that may have finished since)."""
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[T]:
        """Take the items whose deadline is ``now`` or earlier off the heap; yield those not
        done yet."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if not item.done():
                yield item

    def prune(self, unfinished: int) -> None:
        """Drop the finished items if the heap is large and holds over twice ``unfinished``
        (at least the items not done yet: the caller's count of queued and running tasks)."""
        if len(self._heap) > self._prune_at and len(self._heap) > 2 * unfinished:
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
