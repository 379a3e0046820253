import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.adapters.lists import ListDirectory, list_for_event, stringid_for
from service.app.settings import ListTarget
from service.core.coalesce import ListRef
from service.core.errors import PermanentApiError, PoisonMessage
from service.core.model import Action, MembershipEvent


def ev(**kw: str | None) -> MembershipEvent:
    base = dict(
        event_id="e",
        occurred_at_ms=0,
        email="a@b.com",
        audience_id="a1",
        audience_name="VIP  Buyers",
        action=Action.ENTERED,
        campaign_id="c9",
        treatment_group="B",
    )
    base.update(kw)
    return MembershipEvent(**base)  # type: ignore[arg-type]


def test_default_template_and_whitespace() -> None:
    assert list_for_event(ev(), "{audience_name}", {}) == ListRef(name="VIP Buyers")


def test_treatment_group_lists() -> None:
    assert (
        list_for_event(ev(), "{audience_name} / {campaign_id} / {treatment_group}", {}).name
        == "VIP Buyers / c9 / B"
    )


def test_mapping_wins() -> None:
    assert list_for_event(ev(), "{audience_name}", {"a1": ListTarget(list_id="12")}) == ListRef(
        list_id="12"
    )


def test_empty_name_is_poison() -> None:
    with pytest.raises(PoisonMessage):
        list_for_event(ev(treatment_group=None), "{treatment_group}", {})


def test_stringid_is_url_safe_and_unique_per_name() -> None:
    a, b = stringid_for("VIP Buyers!"), stringid_for("vip buyers")
    assert a != b
    assert all(ch.isalnum() or ch == "-" for ch in a)


class SlowApi:
    def __init__(self) -> None:
        self.created: list[str] = []

    def find_list(self, name: str) -> str | None:
        time.sleep(0.01)
        return None

    def create_list(self, name: str, stringid: str) -> str:
        self.created.append(name)
        return str(len(self.created))


def test_concurrent_workers_create_a_list_once() -> None:
    api = SlowApi()
    directory = ListDirectory(api, create=True)
    threads = [
        threading.Thread(target=directory.list_id, args=(ListRef(name="X"),)) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert api.created == ["X"]


def test_creation_turned_off() -> None:
    with pytest.raises(PermanentApiError) as info:
        ListDirectory(SlowApi(), create=False).list_id(ListRef(name="X"))
    assert info.value.code == "list_missing"


class RacingApi(SlowApi):
    """Another replica creates the list between our lookup and our create."""

    def __init__(self) -> None:
        super().__init__()
        self.finds = 0

    def find_list(self, name: str) -> str | None:
        self.finds += 1
        return None if self.finds == 1 else "77"

    def create_list(self, name: str, stringid: str) -> str:
        raise PermanentApiError(422, "duplicate", "The stringid is already in use")


def test_losing_a_creation_race_uses_the_winners_list() -> None:
    assert ListDirectory(RacingApi(), create=True).list_id(ListRef(name="X")) == "77"


def test_list_namer_caches_and_matches_the_pure_function() -> None:
    from service.adapters.lists import ListNamer

    namer = ListNamer("{audience_name} {treatment_group}", {})
    assert namer(ev()) == list_for_event(ev(), "{audience_name} {treatment_group}", {})
    assert namer(ev()) is namer(ev())
    assert namer(ev(treatment_group="C")).name == "VIP Buyers C"


_TEMPLATES = (
    "{audience_name}",
    "{audience_id}",
    "{audience_name} {treatment_group}",
    "{campaign_id}-{audience_name!s:>12}",
    "{treatment_group}",
    "plain {0}",  # not a field the namer knows: every field is part of the key
)


@given(
    template=st.sampled_from(_TEMPLATES),
    mapped=st.booleans(),
    events=st.lists(
        st.tuples(
            st.sampled_from(["a1", "a2", "a3"]),
            st.sampled_from(["VIP", "Churn", "VIP "]),
            st.sampled_from([None, "c1", "c2"]),
            st.sampled_from([None, "A", "B"]),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_list_namer_answers_what_the_pure_function_answers(
    template: str, mapped: bool, events: list[tuple[str, str, str | None, str | None]]
) -> None:
    """The cache key holds only the fields that decide the list; it must never merge two events
    that the pure function names differently (a mapping makes the audience id decide too)."""
    from service.adapters.lists import ListNamer

    mapping = {"a2": ListTarget(list_id="12")} if mapped else {}
    namer = ListNamer(template, mapping)
    for audience_id, name, campaign, group in events:
        event = ev(
            audience_id=audience_id, audience_name=name, campaign_id=campaign, treatment_group=group
        )
        try:
            expected: ListRef | str = list_for_event(event, template, mapping)
        except (PoisonMessage, IndexError) as exc:
            expected = type(exc).__name__
        try:
            got: ListRef | str = namer(event)
        except (PoisonMessage, IndexError) as exc:
            got = type(exc).__name__
        assert got == expected
