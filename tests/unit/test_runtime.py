import gc

import pytest

from service.app.runtime import CollectionSchedule, Collector


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
