import gc
from pathlib import Path

import pytest

from service.app.runtime import CollectionSchedule, Collector, MemoryTrimmer


def test_schedule_is_due_after_the_interval_or_the_object_count() -> None:
    schedule = CollectionSchedule(interval=60.0, objects=1000)
    assert not schedule.due(100.0, 0)  # the first call starts the clock
    assert not schedule.due(159.9, 999)
    assert schedule.due(160.0, 0)  # a minute went by
    assert schedule.due(120.0, 1000)  # many objects since the last one
    schedule.collected(120.0)
    assert not schedule.due(179.9, 10)
    assert schedule.due(180.0, 10)


def make_cycles(count: int) -> None:
    for _ in range(count):
        a: list[object] = []
        a.append(a)  # unreachable once this function returns: only the collector frees it


@pytest.mark.usefixtures("collector_off")
def test_collector_frees_cycles_when_due_and_only_then() -> None:
    collector = Collector(CollectionSchedule(interval=60.0, objects=10**9))
    assert collector.maybe_collect(0.0) is None  # starts the clock
    make_cycles(100)
    assert collector.maybe_collect(59.0) is None
    collected = collector.maybe_collect(60.0)
    assert collected is not None
    found, pause = collected
    assert found >= 100
    assert pause >= 0.0
    assert collector.maybe_collect(61.0) is None


@pytest.mark.usefixtures("collector_off")
def test_collector_runs_early_when_objects_pile_up() -> None:
    collector = Collector(CollectionSchedule(interval=3600.0, objects=5_000))
    collector.maybe_collect(0.0)
    gc.collect()  # the object count starts from zero
    make_cycles(6_000)
    collected = collector.maybe_collect(1.0)
    assert collected is not None and collected[0] >= 6_000


def test_collector_leaves_collection_to_cpython_while_it_is_on() -> None:
    assert gc.isenabled()
    collector = Collector(CollectionSchedule(interval=0.0, objects=0))
    assert collector.maybe_collect(0.0) is None
    assert collector.maybe_collect(100.0) is None


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def test_the_trimmer_gives_memory_back_every_interval_and_after_a_collection() -> None:
    libc = FakeLibc()
    trimmer = MemoryTrimmer(interval=5.0, libc=libc)
    assert trimmer.available
    assert trimmer.maybe_trim(100.0) is None  # the first call starts the clock
    assert trimmer.maybe_trim(104.9) is None
    assert trimmer.maybe_trim(105.0) is not None
    assert libc.calls == [0]
    assert trimmer.maybe_trim(109.9) is None
    assert trimmer.maybe_trim(107.0, force=True) is not None  # a collection just ran
    assert trimmer.maybe_trim(111.9) is None  # the interval counts from the forced one
    assert trimmer.maybe_trim(112.0) is not None
    assert libc.calls == [0, 0, 0]


def test_without_malloc_trim_the_trimmer_does_nothing() -> None:
    trimmer = MemoryTrimmer(interval=0.0, libc=object())  # musl, macOS: no such function
    assert not trimmer.available
    assert trimmer.maybe_trim(0.0, force=True) is None


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_trimming_returns_freed_heap_pages_to_the_system() -> None:
    """64 MiB in 2,000-byte blocks (glibc's heap, not mmap), one in 64 kept: freed, the rest
    stays resident (the live blocks pin the heap); trimmed, most of it goes back. The
    container's image and this machine are glibc: the trimmer must find ``malloc_trim``."""
    trimmer = MemoryTrimmer(interval=0.0)
    assert trimmer.available
    trimmer.maybe_trim(0.0, force=True)
    blocks = [bytes(2000) for _ in range(32 * 1024)]
    kept = blocks[::64]
    del blocks
    before = _resident_bytes()
    assert trimmer.maybe_trim(1.0, force=True) is not None
    after = _resident_bytes()
    freed = 64 * 2**20 * 63 / 64
    assert before - after > freed / 2, (before, after)
    assert len(kept) == 512
