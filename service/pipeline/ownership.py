"""Which partitions this replica owns, and since when: the one place that answers "is this
work still ours?".

Every assignment of a partition starts a new *generation*. Work carries the generation it was
started under; its result is applied only if ``owns(partition, generation)`` still holds, so a
result that comes back after the partition was revoked (or revoked and assigned again) never
completes offsets the new owner re-tracked, never writes a ledger entry the new owner restores
over, and never parks a record twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Ownership:
    assigned: set[int] = field(default_factory=set)
    restoring: set[int] = field(default_factory=set)  # assigned, ledger not fully read yet
    _generation: dict[int, int] = field(default_factory=dict)

    def assign(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self.assigned.add(partition)
            self.restoring.add(partition)
            self._generation[partition] = self._generation.get(partition, 0) + 1

    def revoke(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        self.assigned -= gone
        self.restoring -= gone

    def restored(self, partition: int) -> None:
        self.restoring.discard(partition)

    def generation(self, partition: int) -> int:
        """The current generation (0 for a partition never assigned)."""
        return self._generation.get(partition, 0)

    def owns(self, partition: int, generation: int) -> bool:
        """Is ``partition`` still ours, in the same assignment as ``generation``?"""
        return partition in self.assigned and self._generation.get(partition) == generation

    def ready(self, partition: int) -> bool:
        """Owned and its ledger loaded: its changes may be decided and applied."""
        return partition in self.assigned and partition not in self.restoring

    def stamp(self, partitions: Iterable[int]) -> dict[int, int]:
        """The current generation of each of ``partitions`` (for work that spans several)."""
        return {p: self.generation(p) for p in partitions}

    def owns_all(self, stamp: dict[int, int]) -> bool:
        return all(self.owns(p, g) for p, g in stamp.items())
