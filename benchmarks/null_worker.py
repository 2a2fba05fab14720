"""The seed's null model, in a module of its own: it imports ``stateful_pool`` from whatever
the server's import path holds first (ours, or 0.3.2's for the seed-shape server on 0.3.2),
and the servers that need it import this module only once that path is set."""

from __future__ import annotations

from stateful_pool import SWorker


class NullWorker(SWorker):  # type: ignore[type-arg]  (0.3.2's SWorker takes parameters too)
    """Answers the size of what it was sent."""

    def spawn(self) -> None:
        return None

    def execute(self, data: bytes) -> dict[str, int]:
        return {"bytes": len(data)}
