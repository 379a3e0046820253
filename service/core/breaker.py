"""The dead-letter breaker: a partition whose recent records are mostly poison stops. Pure.

arroyo's ``DlqLimit`` idea, per partition: parking one bad record keeps the partition flowing
(README "The event contract"), but a producer that breaks the contract turns every record into
a dead letter, and parking thousands of them silently is worse than stopping. So when more than
``max_share`` of the last ``window`` records of a partition were poison (refused by the decoder
or the validation: never an AC refusal, which says nothing about the producer), the partition
*trips*: the pipeline pauses it (``service/pipeline/source.py``) until the process restarts.

The window counts offsets, not calls: a poison record at offset ``o`` stays counted until the
partition has moved ``window`` offsets past it. So valid records cost nothing here (the hot
path), and records before the breaker's first sight of a partition count as valid: a partition
trips only once more than ``max_share * window`` poison records lie within ``window`` offsets.
A fresh start (a restart, a new owner) begins with an empty window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class PoisonBreaker:
    """Invariant: ``partition in tripped`` iff, since it was last forgotten, more than
    ``limit`` poison offsets were once within ``window`` offsets of each other."""

    def __init__(self, window: int, max_share: float) -> None:
        if window < 1 or not 0.0 < max_share <= 1.0:
            raise ValueError("window >= 1 and 0 < max_share <= 1")
        self.window = window
        self.max_share = max_share
        self.limit = int(max_share * window)  # more poison than this trips
        self.tripped: set[int] = set()
        self._poison: dict[int, deque[int]] = {}

    @classmethod
    def off(cls) -> PoisonBreaker:
        return cls(1, 1.0)

    @property
    def enabled(self) -> bool:
        return self.limit < self.window

    def poison(self, partition: int, offset: int) -> bool:
        """Record a poison record at ``offset``; True when this one trips the partition."""
        if not self.enabled or partition in self.tripped:
            return False
        seen = self._poison.setdefault(partition, deque())
        seen.append(offset)
        while seen and seen[0] <= offset - self.window:
            seen.popleft()
        if len(seen) > self.limit:
            self.tripped.add(partition)
            return True
        return False

    def share(self, partition: int) -> float:
        """The share of poison in the partition's window (for logs)."""
        return len(self._poison.get(partition, ())) / self.window

    def forget(self, partitions: Iterable[int]) -> None:
        """The partitions left this replica: a new owner starts with an empty window."""
        for partition in partitions:
            self.tripped.discard(partition)
            self._poison.pop(partition, None)
