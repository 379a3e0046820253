from hypothesis import example, given
from hypothesis import strategies as st

from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.model import Action, MembershipEvent

A = ListRef(name="A")
B = ListRef(name="B")


def ev(email: str, action: Action, n: int = 0) -> MembershipEvent:
    return MembershipEvent(f"e{n}", n, email, "aud", "A", action)


def test_last_event_wins_and_carries_all_offsets() -> None:
    c = Coalescer(window=5)
    assert not c.add(0, A, ev("x@y.com", Action.ENTERED), b"1", 10, now=0)
    assert c.add(0, A, ev("x@y.com", Action.EXITED), b"2", 11, now=1)
    assert c.take_due(4.9, limit=10, busy=set()) == []
    [group] = c.take_due(5.0, limit=10, busy=set())
    [change] = group
    assert change.event.action is Action.EXITED
    assert change.raw == b"2"
    assert change.offsets == [10, 11]
    assert len(c) == 0


def test_due_from_first_event_so_hot_keys_do_not_starve() -> None:
    c = Coalescer(window=5)
    for i in range(10):
        c.add(0, A, ev("x@y.com", Action.ENTERED, i), None, i, now=i * 0.9)
    assert len(c.take_due(5.0, limit=10, busy=set())) == 1


def test_a_caught_up_partition_sends_its_backlog_when_a_kept_up_consumer_would_have() -> None:
    """Read at now=100 (wall clock 1000), window 5: the record published at 900 is long past its
    window, the one published at 997 has 2 s of it left; a partition not caught up waits."""
    c = Coalescer(window=5)
    published = {0: 900.0, 1: 997.0, 2: 998.0, 7: 900.0}
    c.add(0, A, ev("old@y.com", Action.ENTERED), None, 0, now=100)
    c.add(0, A, ev("recent@y.com", Action.ENTERED), None, 1, now=100)
    c.add(0, A, ev("old@y.com", Action.EXITED), None, 2, now=100)  # the change keeps offset 0
    c.add(1, A, ev("other@y.com", Action.ENTERED), None, 7, now=100)  # partition 1: not at its end
    assert c.expedite(0, 100.0, 1000.0, published.get) == 2
    [group] = c.take_due(100.0, limit=10, busy=set())
    assert [(ch.email, ch.event.action) for ch in group] == [("old@y.com", Action.EXITED)]
    assert c.take_due(101.9, limit=10, busy=set()) == []
    assert [g[0].email for g in c.take_due(102.0, limit=10, busy=set())] == ["recent@y.com"]
    assert c.take_due(104.9, limit=10, busy=set()) == []
    assert [g[0].email for g in c.take_due(105.0, limit=10, busy=set())] == ["other@y.com"]
    # A second call looks only at changes added since the first; unknown times change nothing.
    c.add(0, A, ev("new@y.com", Action.ENTERED), None, 3, now=106)
    assert c.expedite(0, 106.0, 1006.0, published.get) == 0
    assert c.take_due(110.9, limit=10, busy=set()) == []
    assert len(c.take_due(111.0, limit=10, busy=set())) == 1


def test_one_group_per_email_with_all_its_lists() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    c.add(0, B, ev("x@y.com", Action.EXITED), None, 2, now=0)
    c.add(0, A, ev("z@y.com", Action.ENTERED), None, 3, now=0)
    groups = c.take_due(0, limit=10, busy=set())
    assert sorted(len(g) for g in groups) == [1, 2]


def test_busy_email_is_deferred_not_lost() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    c.add(0, A, ev("free@y.com", Action.ENTERED), None, 2, now=0)
    [[free]] = c.take_due(1, limit=10, busy={"x@y.com"})
    assert free.email == "free@y.com"
    assert len(c) == 1
    # Set aside until released: not re-examined on every call while the email is busy.
    assert c.take_due(2, limit=10, busy=set()) == []
    c.release("x@y.com")
    [[change]] = c.take_due(2, limit=10, busy=set())
    assert change.email == "x@y.com" and change.offsets == [1]


def test_a_change_added_while_its_email_is_set_aside_comes_out_after_release() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED, 1), None, 1, now=0)
    assert c.take_due(1, limit=10, busy={"x@y.com"}) == []
    c.add(0, A, ev("x@y.com", Action.EXITED, 2), None, 2, now=1)  # supersedes the one aside
    c.add(0, B, ev("x@y.com", Action.ENTERED, 3), None, 3, now=1)  # a new list, queued anew
    c.release("x@y.com")
    [group] = c.take_due(5, limit=10, busy=set())
    assert {(ch.target, ch.event.action) for ch in group} == {
        (A, Action.EXITED),
        (B, Action.ENTERED),
    }
    assert c.take_due(5, limit=10, busy=set()) == [] and len(c) == 0


def test_limit_and_flush_all() -> None:
    c = Coalescer(window=100)
    for i in range(5):
        c.add(0, A, ev(f"p{i}@y.com", Action.ENTERED), None, i, now=0)
    assert c.take_due(1, limit=10, busy=set()) == []
    assert len(c.take_due(1, limit=3, busy=set(), flush_all=True)) == 3
    assert len(c) == 2


def test_requeue_yields_to_newer_change_which_inherits_offsets() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    [[old]] = c.take_due(0, limit=1, busy=set())
    c.add(0, A, ev("x@y.com", Action.EXITED), None, 2, now=1)
    c.requeue(old, not_before=10)
    [[newer]] = c.take_due(1, limit=1, busy=set())
    assert newer.event.action is Action.EXITED
    assert newer.offsets == [1, 2]


def test_requeue_respects_not_before() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    [[change]] = c.take_due(0, limit=1, busy=set())
    c.requeue(change, not_before=30)
    assert c.take_due(29, limit=1, busy=set()) == []
    assert len(c.take_due(30, limit=1, busy=set())) == 1


def test_discard_partition() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    c.add(1, A, ev("z@y.com", Action.ENTERED), None, 1, now=0)
    assert len(c.discard([1])) == 1
    [[left]] = c.take_due(0, limit=5, busy=set())
    assert left.partition == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@x.com", "b@x.com", "c@x.com"]),
            st.sampled_from([A, B]),
            st.sampled_from(list(Action)),
            st.floats(0, 3),
        ),
        max_size=80,
    ),
    st.floats(0, 4),
)
def test_coalescing_then_applying_equals_applying_every_event(events, window) -> None:  # type: ignore[no-untyped-def]
    """Property: the final state is the same whether or not events are coalesced, whatever the
    window and the moments the loop takes due work; every offset is covered exactly once."""
    c = Coalescer(window=window)
    applied: dict[tuple[str, ListRef], Action] = {}
    expected: dict[tuple[str, ListRef], Action] = {}
    covered: list[int] = []
    now = 0.0
    for offset, (email, target, action, gap) in enumerate(events):
        now += gap
        c.add(0, target, ev(email, action, offset), None, offset, now)
        expected[(email, target)] = action
        for group in c.take_due(now, limit=2, busy=set()):
            for change in group:
                applied[(change.email, change.target)] = change.event.action
                covered.extend(change.offsets)
    for group in c.take_due(now, limit=10**6, busy=set(), flush_all=True):
        for change in group:
            applied[(change.email, change.target)] = change.event.action
            covered.extend(change.offsets)
    assert applied == expected
    assert sorted(covered) == list(range(len(events)))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@x.com", "b@x.com", "c@x.com", "d@x.com"]),
            st.sampled_from([A, B]),
            st.floats(0, 2),  # gap before this add
            st.one_of(st.none(), st.floats(-5, 10)),  # take and requeue at now + this
        ),
        max_size=60,
    )
)
def test_due_order_holds_across_new_and_retried_changes(steps) -> None:  # type: ignore[no-untyped-def]
    """New changes queue in arrival order and retries in a heap; taken together they still come
    out by due time, and nothing is lost or handed out twice."""
    c = Coalescer(window=1.0)
    now = 0.0
    for n, (email, target, gap, retry_in) in enumerate(steps):
        now += gap
        c.add(0, target, ev(email, Action.ENTERED, n), None, n, now)
        if retry_in is not None:
            for group in c.take_due(now, limit=1, busy=set()):
                for change in group:
                    c.requeue(change, now + retry_in)
    dues: list[float] = []
    taken = 0
    while True:
        groups = c.take_due(float("inf"), limit=1, busy=set())
        if not groups:
            break
        dues.append(min(change.due_at for change in groups[0]))
        taken += len(groups[0])
    assert dues == sorted(dues)
    assert len(c) == 0
    assert taken == len({(email, target) for email, target, _, _ in steps})


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@x.com", "b@x.com", "c@x.com"]),
            st.sampled_from([A, B]),
            st.booleans(),  # take due work now, keeping what it hands out busy
            st.booleans(),  # release every busy email afterwards
        ),
        max_size=60,
    )
)
def test_busy_emails_hold_their_changes_until_released_and_nothing_is_lost(steps) -> None:  # type: ignore[no-untyped-def]
    c = Coalescer(window=0.0)
    busy: set[str] = set()
    covered: list[int] = []
    for n, (email, target, take, release) in enumerate(steps):
        c.add(0, target, ev(email, Action.ENTERED, n), None, n, float(n))
        if take:
            for group in c.take_due(float(n), limit=2, busy=busy):
                assert group[0].email not in busy
                busy.add(group[0].email)
                covered.extend(o for change in group for o in change.offsets)
        if release:
            for done in list(busy):
                busy.discard(done)
                c.release(done)
    for done in list(busy):
        c.release(done)
    for group in c.take_due(float("inf"), limit=10**6, busy=set(), flush_all=True):
        covered.extend(o for change in group for o in change.offsets)
    assert sorted(covered) == list(range(len(steps)))
    assert len(c) == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a@x.com", "b@x.com", "c@x.com", "d@x.com"]),
            st.integers(0, 1),  # partition
            st.floats(0, 2),  # gap before this add
            st.one_of(
                st.none(), st.floats(0, 3)
            ),  # then: the partition caught up; records this old
            st.booleans(),  # then: take one due group and retry it a second later
        ),
        max_size=60,
    )
)
def test_catching_up_moves_changes_forward_only_and_loses_nothing(steps) -> None:  # type: ignore[no-untyped-def]
    c = Coalescer(window=1.0)
    now = 0.0
    read_at: dict[tuple[int, str], float] = {}
    for n, (email, partition, gap, age, retry) in enumerate(steps):
        now += gap
        if not c.add(partition, A, ev(email, Action.ENTERED, n), None, n, now):
            read_at[(partition, email)] = now
        if age is not None:
            published = 1000.0 + now - age
            c.expedite(partition, now, 1000.0 + now, lambda _offset, t=published: t)
        if retry:
            for group in c.take_due(now, limit=1, busy=set()):
                for change in group:
                    c.requeue(change, now + 1.0)
                    read_at[(change.partition, change.email)] = now  # not before its retry
    dues: list[float] = []
    taken: list[tuple[int, str]] = []
    while True:
        groups = c.take_due(float("inf"), limit=1, busy=set())
        if not groups:
            break
        for change in groups[0]:
            # Sooner than a window after it was read, never before it was read.
            assert read_at[change.key[:2]] <= change.due_at <= read_at[change.key[:2]] + 1.0 + 1e-9
            dues.append(change.due_at)
            taken.append(change.key[:2])
    assert dues == sorted(dues)
    assert sorted(taken) == sorted({(p, e) for e, p, _, _, _ in steps})
    assert len(c) == 0


def test_one_email_due_in_two_partitions_never_goes_to_two_workers_at_once() -> None:
    """A mis-keyed producer put one email in two partitions: a call hands out one group of
    that email (one partition's changes), the other waits for the next call, and is not lost."""
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    c.add(1, B, ev("x@y.com", Action.EXITED), None, 7, now=0)
    c.add(0, A, ev("z@y.com", Action.ENTERED), None, 2, now=0)
    groups = c.take_due(0, limit=10, busy=set())
    assert sorted((g[0].email, g[0].partition) for g in groups) == [("x@y.com", 0), ("z@y.com", 0)]
    assert len(c) == 1
    [[other]] = c.take_due(0, limit=10, busy=set())
    assert (other.partition, other.target, other.offsets) == (1, B, [7])
    assert len(c) == 0 and c.take_due(100, limit=10, busy=set()) == []


@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from(["a@y.com", "b@y.com"]), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 4),
)
def test_no_call_hands_out_one_email_twice_and_every_change_comes_out(  # type: ignore[no-untyped-def]
    adds, limit
) -> None:
    c = Coalescer(window=0)
    for offset, (partition, email, exit_) in enumerate(adds):
        c.add(partition, A, ev(email, Action.EXITED if exit_ else Action.ENTERED), None, offset, 0)
    expected = {(p, e) for p, e, _ in adds}
    seen: set[tuple[int, str]] = set()
    for _ in range(len(expected) + 1):
        groups = c.take_due(0, limit=limit, busy=set())
        assert len(groups) <= limit
        emails = [g[0].email for g in groups]
        assert len(emails) == len(set(emails))
        for g in groups:
            assert len({ch.partition for ch in g}) == 1
            seen |= {(ch.partition, ch.email) for ch in g}
    assert seen == expected and len(c) == 0


def pending_raw(c: Coalescer) -> int:
    return sum(len(ch.raw) for ch in c._pending.values() if ch.raw)


def test_raw_bytes_count_exactly_the_records_pending_changes_keep() -> None:
    c = Coalescer(window=0)
    assert c.raw_bytes == 0
    c.add(0, A, ev("x@y.com", Action.ENTERED), b"12345", 1, now=0)
    assert c.raw_bytes == 5
    c.add(0, A, ev("x@y.com", Action.EXITED), b"12", 2, now=0)  # superseded: the new record
    assert c.raw_bytes == 2
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 3, now=0)  # a record kept without bytes
    assert c.raw_bytes == 0
    c.add(0, A, ev("x@y.com", Action.EXITED), b"123", 4, now=0)
    c.add(0, B, ev("x@y.com", Action.ENTERED), b"1234", 5, now=0)
    c.add(1, A, ev("z@y.com", Action.ENTERED), b"1", 6, now=0)
    assert c.raw_bytes == 8
    [group] = c.take_due(0, limit=1, busy=set())
    assert {ch.email for ch in group} == {"x@y.com"} and c.raw_bytes == 1
    c.requeue(group[0], not_before=1)
    assert c.raw_bytes == 1 + len(group[0].raw or b"")
    assert c.discard([1]) and c.raw_bytes == pending_raw(c)
    c.discard([0])
    assert c.raw_bytes == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "take", "discard", "requeue"]),
            st.integers(0, 1),
            st.sampled_from(["a@y.com", "b@y.com"]),
            st.one_of(st.none(), st.binary(max_size=5)),
        ),
        max_size=30,
    )
)
def test_raw_bytes_always_equal_what_pending_changes_hold(steps) -> None:  # type: ignore[no-untyped-def]
    c = Coalescer(window=0)
    taken: list = []  # type: ignore[type-arg]
    for offset, (step, partition, email, raw) in enumerate(steps):
        if step == "add":
            c.add(partition, A, ev(email, Action.ENTERED, offset), raw, offset, now=offset)
        elif step == "take":
            taken += [ch for g in c.take_due(offset, limit=1, busy=set()) for ch in g]
        elif step == "discard":
            c.discard([partition])
        elif taken:
            c.requeue(taken.pop(), not_before=offset)
        assert c.raw_bytes == pending_raw(c)


def test_a_new_change_keeps_its_record_and_when_it_was_first_seen() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), b"rec", 1, now=7)
    assert c.next_due_at() == 12
    [[change]] = c.take_due(12, limit=1, busy=set())
    assert (change.raw, change.first_seen, change.due_at, change.offsets) == (b"rec", 7, 12, [1])


def test_a_new_event_forgets_the_verification_and_the_back_off_but_not_a_refusal() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.EXITED), None, 1, now=0)
    [[change]] = c.take_due(0, limit=1, busy=set())
    change.verified_at, change.attempts, change.failing_since = 3.0, 2, 1.5
    change.force_single = True
    c.requeue(change, not_before=10)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 2, now=1)
    assert change.verified_at == 0.0 and change.attempts == 0 and change.failing_since is None
    assert change.force_single
    # without a back-off to forget, nothing else changes
    change.failing_since = 4.0
    c.add(0, A, ev("x@y.com", Action.EXITED), None, 3, now=2)
    assert change.failing_since == 4.0


def test_a_new_event_forgets_a_verification_or_a_back_off_alone() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.EXITED), None, 1, now=0)
    [[change]] = c.take_due(0, limit=1, busy=set())
    change.verified_at = 3.0  # checked, never failed
    c.requeue(change, not_before=10)
    c.add(0, A, ev("x@y.com", Action.EXITED), None, 2, now=1)
    assert change.verified_at == 0.0
    change.attempts, change.failing_since = 1, 1.5  # failed, never checked
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 3, now=2)
    assert change.attempts == 0 and change.failing_since is None


def test_next_due_at_is_the_earliest_live_change() -> None:
    c = Coalescer(window=5)
    assert c.next_due_at() is None
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=1)
    c.add(0, A, ev("z@y.com", Action.ENTERED), None, 2, now=2)
    assert c.next_due_at() == 6
    c.take_due(6, limit=1, busy=set())
    assert c.next_due_at() == 7
    c.take_due(7, limit=1, busy=set())
    assert c.next_due_at() is None


def test_a_requeued_refusal_is_inherited_by_the_newer_change() -> None:
    for old_refused, newer_refused in [(True, False), (False, True), (False, False)]:
        c = Coalescer(window=0)
        c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
        [[old]] = c.take_due(0, limit=1, busy=set())
        old.force_single = old_refused
        c.add(0, A, ev("x@y.com", Action.EXITED), None, 2, now=1)
        c._pending[(0, "x@y.com", A)].force_single = newer_refused
        c.requeue(old, not_before=5)
        [[newer]] = c.take_due(1, limit=1, busy=set())
        assert newer.force_single is (old_refused or newer_refused)
        assert newer.offsets == [1, 2]


def test_discarding_one_partition_of_a_mis_keyed_email_keeps_the_other() -> None:
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    c.add(1, A, ev("x@y.com", Action.EXITED), None, 2, now=0)
    [dropped] = c.discard([1])
    assert dropped.partition == 1
    [[kept]] = c.take_due(0, limit=10, busy=set())
    assert (kept.partition, kept.offsets) == (0, [1])
    # the partition comes back (assigned again): its changes work as before
    c.add(1, A, ev("x@y.com", Action.EXITED), None, 3, now=1)
    c.add(0, B, ev("x@y.com", Action.ENTERED), None, 4, now=1)
    got = [g for _ in range(3) for g in c.take_due(1, limit=10, busy=set())]
    assert sorted((g[0].partition, g[0].offsets[0]) for g in got) == [(0, 4), (1, 3)]
    assert len(c) == 0


def test_expedite_of_nothing_moves_nothing() -> None:
    assert Coalescer(window=5).expedite(0, 1.0, 1000.0, lambda _: 0.0) == 0


def test_a_change_once_examined_is_not_expedited_by_a_later_call() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=100)
    assert c.expedite(0, 100.0, 1000.0, lambda _: None) == 0  # publication unknown then
    assert c.expedite(0, 100.0, 1000.0, lambda _: 900.0) == 0  # looked at already
    assert c.next_due_at() == 105


def test_each_partition_keeps_its_own_place_in_the_queue() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=100)
    assert c.expedite(1, 100.0, 1000.0, lambda _: 900.0) == 0  # partition 1 has nothing
    assert c.expedite(0, 100.0, 1000.0, lambda _: 900.0) == 1


def test_a_record_published_when_it_was_read_keeps_its_window() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=100)
    assert c.expedite(0, 100.0, 1000.0, lambda _: 1000.0) == 0
    assert c.next_due_at() == 105


def test_an_unknown_publication_does_not_stop_the_older_changes_being_expedited() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("old@y.com", Action.ENTERED), None, 1, now=100)
    c.add(1, A, ev("other@y.com", Action.ENTERED), None, 9, now=100)
    c.add(0, A, ev("new@y.com", Action.ENTERED), None, 2, now=100)
    published = {1: 900.0}  # offset 2: unknown
    assert c.expedite(0, 100.0, 1000.0, published.get) == 1
    [[change]] = c.take_due(100, limit=10, busy=set())
    assert change.email == "old@y.com"


def test_a_retry_or_a_change_already_taken_is_never_expedited() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("a@y.com", Action.ENTERED), None, 1, now=100)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 2, now=100)
    c.add(0, B, ev("x@y.com", Action.ENTERED), None, 3, now=101)  # x's B entry goes stale
    [[a]] = c.take_due(105, limit=1, busy=set())
    [group] = c.take_due(105, limit=1, busy=set())
    assert {ch.target for ch in group} == {A, B}
    c.add(0, A, ev("n@y.com", Action.ENTERED), None, 4, now=102)
    a.attempts = 1
    c.requeue(a, not_before=200)  # a retry, due at 200, queued after n
    moved = c.expedite(0, 102.0, 1000.0, lambda _: 900.0)
    assert moved == 1  # the new change only
    assert c.next_due_at() == 102
    c.take_due(102, limit=10, busy=set())
    assert c.next_due_at() == 200


def test_a_change_sent_back_without_a_failure_is_expedited_like_a_new_one() -> None:
    """Requeued with no attempt counted (an import that never reached AC) at the very time the
    last new change is due: it queues behind it, where catching up finds it."""
    c = Coalescer(window=5)
    c.add(0, A, ev("a@y.com", Action.ENTERED), None, 1, now=100)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 2, now=110)
    [[a]] = c.take_due(105, limit=1, busy=set())
    c.requeue(a, not_before=115)
    assert c.expedite(0, 106.0, 1000.0, lambda _: 900.0) == 2
    assert [g[0].email for g in c.take_due(106, limit=10, busy=set())] == ["a@y.com", "x@y.com"]


# ---- the staleness guard (``stale_tolerance_ms``) ----------------------------------------------


def at(n: int, occurred_at_ms: int, email: str = "x@y.com") -> MembershipEvent:
    return MembershipEvent(f"e{n}", occurred_at_ms, email, "aud", "A", Action.ENTERED)


RECORDS = st.one_of(st.none(), st.binary(min_size=1, max_size=4))


@given(
    tolerance=st.one_of(st.none(), st.integers(0, 50)),
    events=st.lists(st.tuples(st.integers(0, 150), RECORDS, st.booleans()), min_size=1, max_size=8),
)
@example(tolerance=10, events=[(50, b"new", False), (40, b"ok", True)])  # exactly the tolerance
@example(tolerance=10, events=[(50, b"new", True), (39, None, False), (20, b"old", True)])
@example(tolerance=None, events=[(50, b"new", True), (0, b"old", False)])  # no guard
def test_the_staleness_guard_keeps_the_newer_pending_event_and_counts_what_it_folds(
    tolerance: int | None, events: list[tuple[int, bytes | None, bool]]
) -> None:
    """An event that occurred more than the tolerance before the pending one is covered (its
    offset is committed with the change) but not applied; within the tolerance, or without a
    guard, the later record wins with its raw record and its headers. Each record folded by
    the guard is counted once."""
    c = Coalescer(window=5, stale_tolerance_ms=tolerance)
    assert c.stale_records == 0
    kept: tuple[MembershipEvent, bytes | None, list[tuple[str, bytes]] | None] | None = None
    folded = 0
    for offset, (occurred, raw, has_headers) in enumerate(events):
        headers = [("redrives", str(offset).encode())] if has_headers else None
        event = at(offset, occurred)
        assert c.add(0, A, event, raw, offset, now=0, headers=headers) is (offset > 0)
        if (
            kept is not None
            and tolerance is not None
            and occurred + tolerance < kept[0].occurred_at_ms
        ):
            folded += 1
        else:
            kept = (event, raw, headers)
        assert c.stale_records == folded
        assert c.raw_bytes == len(kept[1] or b"")
    [[change]] = c.take_due(5, limit=1, busy=set())
    assert (change.event, change.raw, change.headers) == kept
    assert change.offsets == list(range(len(events)))


@given(
    tolerance=st.one_of(st.none(), st.integers(0, 50)),
    failed_at=st.integers(0, 150),
    newer=st.lists(st.tuples(st.integers(0, 150), RECORDS), min_size=1, max_size=3),
    refused=st.tuples(st.booleans(), st.booleans()),
    other_list=st.booleans(),
)
@example(tolerance=10, failed_at=50, newer=[(30, b"stale")], refused=(False, True), other_list=True)
@example(tolerance=10, failed_at=50, newer=[(40, b"edge")], refused=(True, False), other_list=False)
@example(tolerance=10, failed_at=50, newer=[(45, b"skew")], refused=(False, False), other_list=True)
@example(
    tolerance=None, failed_at=50, newer=[(0, b"old")], refused=(False, False), other_list=False
)
@example(  # the newer records fold once among themselves, then once more beside the failed one
    tolerance=10,
    failed_at=100,
    newer=[(50, b"n"), (30, b"x")],
    refused=(True, True),
    other_list=False,
)
def test_a_requeued_change_yields_to_the_newer_one_unless_that_one_is_stale_beside_it(
    tolerance: int | None,
    failed_at: int,
    newer: list[tuple[int, bytes | None]],
    refused: tuple[bool, bool],
    other_list: bool,
) -> None:
    """A change that failed comes back while newer records of its key are pending. The newer
    change wins and inherits the failed one's offsets, unless it occurred more than the
    tolerance before it: then the failed change stays (due at its retry), covering the newer
    records, and the fold is counted. Either way a refusal is kept, the email's other lists
    stay in its group and the raw bytes count what is pending."""
    c = Coalescer(window=0, stale_tolerance_ms=tolerance)
    c.add(0, A, at(0, failed_at), b"failed", 0, now=0)
    [[failed]] = c.take_due(0, limit=1, busy=set())
    failed.force_single = refused[0]
    for offset, (occurred, raw) in enumerate(newer, start=1):
        c.add(0, A, at(offset, occurred), raw, offset, now=1)
    pending = c._pending[(0, "x@y.com", A)]
    pending.force_single = refused[1]
    if other_list:
        c.add(0, B, at(9, 0), b"b", 9, now=1)
    folded = c.stale_records
    c.requeue(failed, not_before=7)
    stale = tolerance is not None and pending.event.occurred_at_ms + tolerance < failed_at
    assert c.stale_records == folded + stale
    assert c.raw_bytes == pending_raw(c)
    [group] = c.take_due(100, limit=5, busy=set())
    assert len(c) == 0
    assert sorted(ch.target.label() for ch in group) == (["A", "B"] if other_list else ["A"])
    [change] = [ch for ch in group if ch.target == A]
    assert change is (failed if stale else pending)
    assert change.offsets == list(range(len(newer) + 1))
    assert change.force_single is (refused[0] or refused[1])
    assert change.due_at == (7 if stale else 1)


def test_a_change_requeued_beside_two_of_its_emails_others_is_taken_with_them() -> None:
    """The email index keeps a key until an email has a second, then a list: a third key,
    come back by ``requeue``, joins the list."""
    c = Coalescer(window=0)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    [[first]] = c.take_due(0, limit=1, busy=set())
    c.add(0, B, ev("x@y.com", Action.ENTERED), None, 2, now=1)
    c.add(0, ListRef(name="C"), ev("x@y.com", Action.ENTERED), None, 3, now=1)
    c.requeue(first, not_before=1)
    [group] = c.take_due(1, limit=1, busy=set())
    assert sorted(change.target.label() for change in group) == ["A", "B", "C"]
    assert len(c) == 0


# ---- holds: a change waits for a later record of its email ----------------------------------


def _emails(groups: list[list[PendingChange]]) -> list[list[tuple[str, str | None]]]:
    return [[(c.email, c.target.name) for c in g] for g in groups]


def test_a_held_change_waits_for_its_emails_later_record_and_leaves_with_it() -> None:
    c = Coalescer(window=5)
    assert c.add(0, A, ev("x@y.com", Action.ENTERED, 1), None, 1, now=0, hold=True) is False
    c.add(0, A, ev("z@y.com", Action.ENTERED, 2), None, 2, now=0)
    assert len(c) == 2
    assert c.held_partitions() == [0]
    # Long past its window, the held change is not due: only z's is.
    assert _emails(c.take_due(1000, limit=10, busy=set())) == [[("z@y.com", "A")]]
    assert c.next_due_at() is None
    # The email's later record (not held): both lists leave together, due by the first's due.
    c.add(0, B, ev("x@y.com", Action.ENTERED, 3), None, 3, now=1000)
    assert c.held_partitions() == []
    assert c.next_due_at() == 5
    assert _emails(c.take_due(1000, limit=10, busy=set())) == [[("x@y.com", "A"), ("x@y.com", "B")]]
    assert len(c) == 0


def test_a_later_record_the_guard_refuses_still_releases_its_emails_held_change() -> None:
    c = Coalescer(window=5, stale_tolerance_ms=10)
    c.add(0, B, ev("x@y.com", Action.ENTERED, 1000), None, 1, now=0, hold=True)
    c.add(0, A, ev("x@y.com", Action.ENTERED, 1000), None, 2, now=0, hold=True)
    # The email's last record is older than the pending one of its key: folded, not queued.
    assert c.add(0, A, ev("x@y.com", Action.EXITED, 900), None, 3, now=1)
    [group] = c.take_due(5, limit=10, busy=set())
    assert sorted(ch.target.label() for ch in group) == ["A", "B"]
    assert [ch.event.action for ch in group if ch.target == A] == [Action.ENTERED]


def test_holds_released_by_partition_by_flush_and_by_taking_the_email() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("p0@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    c.add(1, A, ev("p1@y.com", Action.ENTERED), None, 1, now=2, hold=True)
    c.add(2, B, ev("p2@y.com", Action.ENTERED), None, 1, now=0)  # queued: no hold
    c.add(2, A, ev("p2@y.com", Action.ENTERED), None, 2, now=0, hold=True)
    assert sorted(c.held_partitions()) == [0, 1, 2]
    # Taking the email's queued change takes its held one too, and the hold is gone.
    assert _emails(c.take_due(5, limit=10, busy=set())) == [[("p2@y.com", "B"), ("p2@y.com", "A")]]
    assert sorted(c.held_partitions()) == [0, 1]
    assert c.release_holds(0) == 1
    assert c.held_partitions() == [1]
    assert _emails(c.take_due(5, limit=10, busy=set())) == [[("p0@y.com", "A")]]
    # A flush takes what is held too (shutting down: nothing waits).
    assert _emails(c.take_due(5, limit=10, busy=set(), flush_all=True)) == [[("p1@y.com", "A")]]
    assert c.held_partitions() == [] and len(c) == 0


def test_discarding_a_partition_forgets_its_holds() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    c.add(1, A, ev("y@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    assert [ch.email for ch in c.discard([0])] == ["x@y.com"]
    assert c.held_partitions() == [1]
    assert c.release_holds() == 1
    assert _emails(c.take_due(5, limit=10, busy=set())) == [[("y@y.com", "A")]]


def test_a_hold_waits_only_in_its_own_partition() -> None:
    """A mis-keyed producer put the email in two partitions: a record of partition 1 does not
    release partition 0's hold (its later record is partition 0's)."""
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    c.add(1, B, ev("x@y.com", Action.ENTERED), None, 1, now=0)
    assert c.held_partitions() == [0]
    [group] = c.take_due(5, limit=10, busy=set())
    assert [(ch.partition, ch.target) for ch in group] == [(1, B)]
    assert c.held_partitions() == [0]
    c.add(0, B, ev("x@y.com", Action.ENTERED), None, 2, now=6)
    [group] = c.take_due(11, limit=10, busy=set())
    assert sorted((ch.partition, ch.target.label()) for ch in group) == [(0, "A"), (0, "B")]


def test_a_second_held_record_of_a_held_email_keeps_it_held() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED, 1), None, 1, now=0, hold=True)
    c.add(0, B, ev("x@y.com", Action.ENTERED, 2), None, 2, now=0, hold=True)
    assert c.held_partitions() == [0]
    assert c.take_due(1000, limit=10, busy=set()) == []
    assert c.release_holds(7) == 0  # no hold in partition 7
    c.add(0, A, ev("w@y.com", Action.ENTERED, 3), None, 3, now=0, hold=True)
    assert c.release_holds(0) == 2  # two emails
    assert len(c.take_due(1000, limit=10, busy=set())) == 2


def test_a_record_releases_only_its_own_partitions_hold_of_the_email() -> None:
    c = Coalescer(window=5)
    c.add(0, A, ev("x@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    c.add(1, A, ev("x@y.com", Action.ENTERED), None, 1, now=0, hold=True)
    c.add(0, B, ev("x@y.com", Action.ENTERED), None, 2, now=0)
    assert c.held_partitions() == [1]
    [group] = c.take_due(1000, limit=10, busy=set())
    assert sorted((ch.partition, ch.target.label()) for ch in group) == [(0, "A"), (0, "B")]
    assert c.take_due(1000, limit=10, busy=set()) == []  # partition 1's still waits
