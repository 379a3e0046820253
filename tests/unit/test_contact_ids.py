from hypothesis import given
from hypothesis import strategies as st

from service.core.contact_ids import IdQueue

_ids = st.one_of(
    st.integers(min_value=0, max_value=10**18 - 1).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=20),  # leading zeros, too long
    st.text(min_size=1, max_size=8),  # anything AC might send one day
)


@given(st.lists(_ids, max_size=300))
def test_ids_come_back_in_order_exactly_as_given(ids: list[str]) -> None:
    queue = IdQueue(ids)
    assert len(queue) == len(ids)
    out = []
    while queue:
        out.append(queue.popleft())
    assert out == ids
    assert len(queue) == 0


def test_decimal_ids_are_kept_as_integers_and_anything_else_as_given() -> None:
    numbers = IdQueue(["12", "7", "0", "999999999999999999"])
    assert numbers._numbers is not None and numbers._strings is None
    for odd in (["12", "007"], ["12", "-3"], ["12", "\uff11\uff12"], ["12", "1" * 19], ["12", ""]):
        queue = IdQueue(odd)
        assert queue._numbers is None, odd
        assert [queue.popleft(), queue.popleft()] == odd


def test_clear_drops_what_is_left_and_an_empty_queue_refuses_popleft() -> None:
    queue = IdQueue(["1", "2", "3"])
    assert queue.popleft() == "1"
    queue.clear()
    assert not queue and len(queue) == 0
    try:
        queue.popleft()
    except IndexError:
        pass
    else:
        raise AssertionError("popleft of an empty queue returned")
