import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.acapi import ApiCall, Reply, run_sync
from service.core.coalesce import ListRef
from service.core.errors import PermanentApiError, PoisonMessage
from service.core.lists import (
    ListDirectory,
    ListTarget,
    list_for_event,
    resolve_list,
    stringid_for,
)
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


def scripted(*replies: Reply) -> tuple[Callable[[ApiCall], Reply], list[ApiCall]]:
    sent: list[ApiCall] = []
    queue = list(replies)

    def send(call: ApiCall) -> Reply:
        sent.append(call)
        return queue.pop(0)

    return send, sent


def answer(status: int, body: object) -> Reply:
    return Reply(status, "application/json", json.dumps(body).encode())


NO_LISTS = answer(200, {"lists": [], "meta": {"total": "0"}})


def resolve(ref: ListRef, send: Callable[[ApiCall], Reply], create: bool = True) -> str:
    return run_sync(
        resolve_list(ref, create=create, sender_url="https://s.test", sender_reminder="r"), send
    )


def test_an_exact_name_is_found_not_a_longer_one() -> None:
    send, sent = scripted(
        answer(200, {"lists": [{"id": "3", "name": "X Buyers"}, {"id": "4", "name": "X"}]})
    )
    assert resolve(ListRef(name="X"), send) == "4"
    assert len(sent) == 1


def test_a_missing_list_is_created_with_the_fields_ac_requires() -> None:
    send, sent = scripted(NO_LISTS, answer(201, {"list": {"id": "9"}}))
    assert resolve(ListRef(name="X"), send) == "9"
    body = sent[1].body["list"]  # type: ignore[index]
    assert {"name", "stringid", "sender_url", "sender_reminder"} <= set(body)


def test_creation_turned_off() -> None:
    send, _ = scripted(NO_LISTS)
    with pytest.raises(PermanentApiError) as info:
        resolve(ListRef(name="X"), send, create=False)
    assert info.value.code == "list_missing"


def test_losing_a_creation_race_uses_the_winners_list() -> None:
    duplicate = answer(
        422, {"errors": [{"title": "in use", "code": "duplicate", "source": {"pointer": "/x"}}]}
    )
    send, _ = scripted(NO_LISTS, duplicate, answer(200, {"lists": [{"id": "77", "name": "X"}]}))
    assert resolve(ListRef(name="X"), send) == "77"


def test_a_mapped_list_id_is_checked_to_exist() -> None:
    send, _ = scripted(answer(200, {"list": {"id": "12"}}))
    assert resolve(ListRef(list_id="12"), send) == "12"
    send, _ = scripted(answer(404, {"message": "No Result found"}))
    with pytest.raises(PermanentApiError):
        resolve(ListRef(list_id="12"), send)


def test_the_directory_trusts_an_id_for_a_while_and_forgets_a_deleted_one() -> None:
    directory = ListDirectory(verify_after=60.0, max_lists=2)
    vip, news = ListRef(name="VIP"), ListRef(name="News")
    directory.learn(vip, "1", now=100.0)
    assert directory.get(vip) == "1" and not directory.stale(vip, 150.0)
    assert directory.stale(vip, 161.0)
    directory.confirm(vip, 161.0)
    assert not directory.stale(vip, 200.0)
    directory.learn(news, "2", now=100.0)
    assert directory.full()
    assert directory.forget_id("1") == [vip]
    assert directory.get(vip) is None and directory.get(news) == "2"
    assert not directory.full()


def test_list_namer_caches_and_matches_the_pure_function() -> None:
    from service.core.lists import ListNamer

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
    from service.core.lists import ListNamer

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
