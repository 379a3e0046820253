"""Per-partition commit watermark. Pure.

Invariants:
- an offset is committable only when it and every tracked offset before it are done;
- ``committable()[p]`` is the first not-done offset of ``p`` (Kafka commits the *next* offset to
  read), or last tracked + 1 when all are done;
- offsets of a dropped (revoked or lost) partition are never reported again; completions for
  them are ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Partition:
    tracked: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_offset: int = -1  # last tracked + 1; -1 until the first offset is tracked


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[int, _Partition] = {}

    def track(self, partition: int, offset: int) -> bool:
        """Record a polled offset. False (and nothing recorded) for a repeat of an old offset."""
        state = self._partitions.setdefault(partition, _Partition())
        if offset < state.next_offset:
            return False
        state.tracked.append(offset)
        state.next_offset = offset + 1
        return True

    def complete(self, partition: int, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is None or offset >= state.next_offset:
            return
        if state.tracked and offset >= state.tracked[0]:
            state.done.add(offset)

    def _advance(self, state: _Partition) -> None:
        tracked, done = state.tracked, state.done
        while tracked and tracked[0] in done:
            done.discard(tracked.popleft())

    def committable(self) -> dict[int, int]:
        """Partition -> offset to commit (the first not-done offset)."""
        result: dict[int, int] = {}
        for partition, state in self._partitions.items():
            if state.next_offset < 0:
                continue
            self._advance(state)
            result[partition] = state.tracked[0] if state.tracked else state.next_offset
        return result

    def distance(self, partition: int, offset: int) -> int:
        """How far ``offset`` is past the partition's commit point (0: it holds the commit
        back; an untracked partition counts as far as the offset itself)."""
        state = self._partitions.get(partition)
        if state is None:
            return offset
        self._advance(state)
        head = state.tracked[0] if state.tracked else state.next_offset
        return max(0, offset - head)

    def outstanding(self, partition: int) -> int:
        """Tracked offsets of ``partition`` not yet committable (duplicate exposure on a crash)."""
        state = self._partitions.get(partition)
        if state is None:
            return 0
        self._advance(state)
        return len(state.tracked)

    def drop(self, partitions: set[int] | list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        """Tracked offsets not yet committable, over every partition (back-pressure counts
        them: a stuck head would otherwise let the tracker grow without bound)."""
        return sum(len(state.tracked) for state in self._partitions.values())
