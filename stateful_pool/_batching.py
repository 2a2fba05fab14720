"""The queue of tasks waiting for a worker, and the rule that forms batches from it.

A pure unit: no threads, no processes, no clock of its own. The dispatcher passes ``now``
(``time.monotonic()``); tests pass whatever time they like.

The rule: when a worker is free, it gets the oldest queued tasks, up to ``max_batch_size``.
If fewer are queued, they are held until the oldest of them has waited ``max_batch_wait``
seconds, in the hope that more arrive; never longer. With ``max_batch_size == 1`` or
``max_batch_wait == 0`` nothing is ever held, so a free worker never idles while a task waits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class PendingQueue(Generic[T]):
    """FIFO of queued items with O(1) removal by key (cancellation, timeouts)."""

    def __init__(self, max_batch_size: int = 1, max_batch_wait: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_wait < 0:
            raise ValueError(f"max_batch_wait must be >= 0 seconds, got {max_batch_wait}")
        self.max_batch_size = max_batch_size
        self.max_batch_wait = max_batch_wait
        self._items: OrderedDict[int, tuple[T, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, key: int, item: T, now: float) -> None:
        self._items[key] = (item, now)

    def remove(self, key: int) -> T | None:
        entry = self._items.pop(key, None)
        return None if entry is None else entry[0]

    def snapshot(self) -> list[T]:
        """The queued items, oldest first (safe to call from another thread)."""
        return [item for item, _ in list(self._items.values())]

    def pop_all(self) -> list[T]:
        items = [item for item, _ in self._items.values()]
        self._items.clear()
        return items

    def due_at(self) -> float | None:
        """When the queued tasks must be handed out even if the batch is not full."""
        if not self._items:
            return None
        if len(self._items) >= self.max_batch_size:
            return float("-inf")
        _, oldest_since = next(iter(self._items.values()))
        return oldest_since + self.max_batch_wait

    def next_batch(self, now: float) -> list[T]:
        """Take the batch a free worker should run now; ``[]`` means hold (or nothing queued)."""
        if self.max_batch_size == 1:  # the common, unbatched case: no holding, no sizing
            return [self._items.popitem(last=False)[1][0]] if self._items else []
        due = self.due_at()
        if due is None or now < due:
            return []
        size = min(self.max_batch_size, len(self._items))
        return [self._items.popitem(last=False)[1][0] for _ in range(size)]


@dataclass
class BatchCounter:
    """Counts the batches handed to workers, by size."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    histogram: dict[int, int] = field(default_factory=dict)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        if size > self.largest:
            self.largest = size
        self.histogram[size] = self.histogram.get(size, 0) + 1

    @property
    def mean(self) -> float:
        return self.items / self.batches if self.batches else 0.0
