"""Per-partition commit watermark. Pure.

Invariants:
- an offset is committable only when it and every tracked offset before it are done;
- ``committable()[p]`` is the first not-done offset of ``p`` (Kafka commits the *next* offset to
  read), or last tracked + 1 when all are done;
- offsets of a dropped (revoked or lost) partition are never reported again; completions for
  them are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NOT_TRACKED, TRACKED, DONE = 0, 1, 2
COMPACT_AFTER = 4096  # entries behind the head before the window is shifted down


@dataclass
class _Partition:
    # One byte per offset from ``base`` on (not an int object, a deque slot and a set entry per
    # offset: a backlog of 500,000 uncommitted records costs 0.5 MB, not ~35): NOT_TRACKED (a
    # gap: an offset never delivered, e.g. a transaction marker), TRACKED, DONE.
    states: bytearray = field(default_factory=bytearray)
    base: int = 0  # the offset of ``states[0]``
    head: int = 0  # index of the first entry not yet committable
    count: int = 0  # tracked entries from ``head`` on
    next_offset: int = -1  # last tracked + 1; -1 until the first offset is tracked


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[int, _Partition] = {}

    def track(self, partition: int, offset: int) -> bool:
        """Record a polled offset. False (and nothing recorded) for a repeat of an old offset."""
        state = self._partitions.setdefault(partition, _Partition())
        if offset < state.next_offset:
            return False
        states = state.states
        if state.head >= len(states):  # nothing outstanding: start the window here
            states.clear()
            state.base, state.head = offset, 0
        elif offset > state.next_offset:
            states.extend(bytes(offset - state.next_offset))  # the gap, never delivered
        states.append(TRACKED)
        state.count += 1
        state.next_offset = offset + 1
        return True

    def complete(self, partition: int, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is None or offset >= state.next_offset:
            return
        at = offset - state.base
        if at >= state.head and state.states[at] == TRACKED:
            state.states[at] = DONE

    def _advance(self, state: _Partition) -> None:
        states, head, end = state.states, state.head, len(state.states)
        while head < end and states[head] != TRACKED:
            if states[head] == DONE:
                state.count -= 1
            head += 1
        if head > COMPACT_AFTER and head > end // 2:
            del states[:head]  # amortised: each entry is moved at most once per halving
            state.base += head
            head = 0
        state.head = head

    @staticmethod
    def _head(state: _Partition) -> int:
        """The first not-done offset, or last tracked + 1 when every one is done (the window
        covers ``base`` to last tracked exactly; call ``_advance`` first)."""
        return state.base + state.head

    def committable(self) -> dict[int, int]:
        """Partition -> offset to commit (the first not-done offset)."""
        result: dict[int, int] = {}
        for partition, state in self._partitions.items():
            if state.next_offset < 0:
                continue
            self._advance(state)
            result[partition] = self._head(state)
        return result

    def distance(self, partition: int, offset: int) -> int:
        """How far ``offset`` is past the partition's commit point (0: it holds the commit
        back; an untracked partition counts as far as the offset itself)."""
        state = self._partitions.get(partition)
        if state is None:
            return offset
        self._advance(state)
        return max(0, offset - self._head(state))

    def outstanding(self, partition: int) -> int:
        """Tracked offsets of ``partition`` not yet committable (duplicate exposure on a crash)."""
        state = self._partitions.get(partition)
        if state is None:
            return 0
        self._advance(state)
        return state.count

    def drop(self, partitions: set[int] | list[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        """Tracked offsets not yet committable, over every partition (back-pressure counts
        them: a stuck head would otherwise let the tracker grow without bound)."""
        return sum(state.count for state in self._partitions.values())
