"""``Ownership``: is this work still ours? Every assignment is a new generation; work started
under one generation is applied only while that very assignment holds."""

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.ownership import Ownership


def test_a_partition_never_assigned_has_generation_zero_and_is_not_owned() -> None:
    own = Ownership()
    assert own.generation(3) == 0
    assert not own.owns(3, 0)
    assert not own.ready(3)
    assert own.stamp([3]) == {3: 0}


def test_an_assignment_is_restoring_until_its_ledger_is_read() -> None:
    own = Ownership()
    own.assign([1, 2])
    assert own.assigned == {1, 2} and own.restoring == {1, 2}
    assert own.generation(1) == 1 and own.generation(2) == 1
    assert own.owns(1, 1) and not own.ready(1)
    own.restored(1)
    assert own.ready(1) and not own.ready(2)
    assert own.restoring == {2}


def test_work_of_a_revoked_assignment_is_not_ours_even_after_the_partition_comes_back() -> None:
    own = Ownership()
    own.assign([0, 5])
    own.restored(0)
    old = own.stamp([0, 5])
    assert old == {0: 1, 5: 1} and own.owns_all(old)
    own.revoke([0])
    assert own.assigned == {5} and own.restoring == {5}
    assert not own.owns(0, 1) and not own.ready(0)
    assert not own.owns_all(old)
    own.assign([0])
    assert own.generation(0) == 2
    assert own.owns(0, 2) and not own.owns(0, 1)
    assert not own.ready(0)  # restoring again: the ledger is read anew
    assert not own.owns_all(old)
    assert own.owns_all(own.stamp([0, 5]))


def test_revoking_keeps_the_other_partitions_restoring_state() -> None:
    own = Ownership()
    own.assign([1, 2, 3])
    own.restored(2)
    own.revoke(iter([1]))  # any iterable
    assert own.assigned == {2, 3}
    assert own.restoring == {3}
    assert own.ready(2) and not own.ready(3)


def test_an_empty_stamp_is_owned() -> None:
    assert Ownership().owns_all({})


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=30))
def test_a_stamp_holds_exactly_until_one_of_its_partitions_is_revoked_or_reassigned(
    steps: list[tuple[bool, int]],
) -> None:
    own = Ownership()
    own.assign([0, 1, 2, 3])
    stamp = own.stamp([0, 1])
    broken = False
    for assign, partition in steps:
        if assign:
            own.assign([partition])
        else:
            own.revoke([partition])
        broken = broken or partition in stamp
        assert own.owns_all(stamp) is not broken
        assert own.generation(partition) >= 1
