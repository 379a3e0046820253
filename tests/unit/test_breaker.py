"""The dead-letter breaker's window (``service/core/breaker.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.breaker import PoisonBreaker


def test_trips_on_more_than_the_share_of_the_window_and_only_once() -> None:
    breaker = PoisonBreaker(10, 0.5)  # more than 5 poison within 10 offsets
    assert [breaker.poison(0, o) for o in range(5)] == [False] * 5
    assert 0 not in breaker.tripped
    assert breaker.poison(0, 5) is True
    assert breaker.tripped == {0}
    assert breaker.poison(0, 6) is False  # already open: reported once


def test_poison_spread_wider_than_the_window_never_trips() -> None:
    breaker = PoisonBreaker(10, 0.5)
    # Every other offset poison: 5 in any 10 offsets, never more than 5.
    assert not any(breaker.poison(0, o) for o in range(0, 1000, 2))
    assert breaker.share(0) == 0.5


def test_partitions_are_counted_apart() -> None:
    breaker = PoisonBreaker(10, 0.5)
    for offset in range(5):
        assert not breaker.poison(0, offset)
        assert not breaker.poison(1, offset)
    assert breaker.poison(1, 5)
    assert breaker.tripped == {1}


def test_forget_starts_a_partition_afresh() -> None:
    breaker = PoisonBreaker(10, 0.5)
    for offset in range(6):
        breaker.poison(3, offset)
    assert breaker.tripped == {3}
    breaker.forget({3})
    assert breaker.tripped == set()
    assert not any(breaker.poison(3, o) for o in range(6, 11))  # five: not more than half
    assert breaker.poison(3, 11)


def test_a_share_of_one_is_off() -> None:
    breaker = PoisonBreaker(10, 1.0)
    assert not breaker.enabled
    assert not any(breaker.poison(0, o) for o in range(100))
    assert PoisonBreaker.off().enabled is False


@pytest.mark.parametrize(("window", "share"), [(0, 0.5), (10, 0.0), (10, 1.5)])
def test_nonsense_is_refused(window: int, share: float) -> None:
    with pytest.raises(ValueError):
        PoisonBreaker(window, share)


@given(
    marks=st.lists(st.booleans(), max_size=300),
    window=st.integers(1, 40),
    share=st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]),
)
def test_trips_exactly_when_the_last_window_offsets_hold_too_much_poison(
    marks: list[bool], window: int, share: float
) -> None:
    """Against the definition: a record trips the partition when, counting it, more than
    ``int(share * window)`` of the last ``window`` offsets (those seen so far) are poison."""
    breaker = PoisonBreaker(window, share)
    limit = int(share * window)
    tripped_at = None
    for offset, poison in enumerate(marks):
        expected = (
            tripped_at is None
            and poison
            and sum(marks[max(0, offset - window + 1) : offset + 1]) > limit
        )
        got = breaker.poison(0, offset) if poison else False
        assert got == expected
        if got:
            tripped_at = offset
    assert (0 in breaker.tripped) == (tripped_at is not None)
