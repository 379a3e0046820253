"""One email's changes applied per contact (``service/core/contact.py``), on scripted replies.

What is pinned here is which requests a first entry costs: AC's ``contact/sync`` answers 201
when it created the contact and 200 when it updated one (``api-notes.md``). A contact created
just now is on no list, so its lists are not read; an existing one's are, because a status 2
there may be the person's own opt-out, which a ``contactLists`` status 1 would override.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from service.core.acapi import ApiCall, Call, Reply, run_sync
from service.core.coalesce import ListRef, PendingChange
from service.core.contact import apply_contact
from service.core.ledger import OPTED_OUT, SUBSCRIBED, Plan
from service.core.model import Action, MembershipEvent
from service.core.outcome import OutcomeKind

LIST = ListRef("VIP")


def reply(status: int, body: object) -> Reply:
    return Reply(status, "application/json", json.dumps(body).encode())


def drive(call: Call[Any], replies: Iterator[Reply]) -> tuple[Any, list[ApiCall]]:
    sent: list[ApiCall] = []

    def send(request: ApiCall) -> Reply:
        sent.append(request)
        return next(replies)

    return run_sync(call, send), sent


def first_entry(email: str = "a@example.com") -> PendingChange:
    event = MembershipEvent("ev-1", 1_700_000_000_000, email, "aud-vip", "VIP", Action.ENTERED)
    change = PendingChange(0, email, LIST, event, b"raw", [1], 0.0, 5.0)
    change.plan = Plan.FIRST_ENTRY
    return change


def test_a_contact_ac_just_created_is_subscribed_without_reading_its_lists() -> None:
    replies = iter(
        [
            reply(201, {"contact": {"id": "7", "email": "a@example.com"}}),
            reply(200, {"contactList": {"list": "11", "contact": "7", "status": 1}}),
        ]
    )
    outcomes, sent = drive(
        apply_contact("a@example.com", [first_entry()], {LIST: "11"}, None, None), replies
    )
    assert [(c.method, c.endpoint) for c in sent] == [
        ("POST", "/contact/sync"),
        ("POST", "/contactLists"),
    ]
    assert sent[1].body == {"contactList": {"list": "11", "contact": "7", "status": "1"}}
    [outcome] = outcomes
    assert (outcome.kind, outcome.known, outcome.contact_id) == (
        OutcomeKind.APPLIED,
        SUBSCRIBED,
        "7",
    )


def test_an_existing_contacts_lists_are_read_and_its_opt_out_is_kept() -> None:
    replies = iter(
        [
            reply(200, {"contact": {"id": "7", "email": "a@example.com"}}),  # updated
            reply(200, {"contactLists": [{"list": "11", "status": "2", "udate": None}]}),
        ]
    )
    outcomes, sent = drive(
        apply_contact("a@example.com", [first_entry()], {LIST: "11"}, None, None), replies
    )
    assert [(c.method, c.endpoint) for c in sent] == [
        ("POST", "/contact/sync"),
        ("GET", "/contacts/{id}/contactLists"),
    ]  # no status 1 over the 2 AC holds
    [outcome] = outcomes
    assert (outcome.kind, outcome.known) == (OutcomeKind.APPLIED, OPTED_OUT)


def test_an_existing_contact_not_on_the_list_is_read_then_subscribed() -> None:
    replies = iter(
        [
            reply(200, {"contact": {"id": "7", "email": "a@example.com"}}),
            reply(200, {"contactLists": [{"list": "12", "status": "2", "udate": None}]}),
            reply(200, {"contactList": {"list": "11", "contact": "7", "status": 1}}),
        ]
    )
    outcomes, sent = drive(
        apply_contact("a@example.com", [first_entry()], {LIST: "11"}, None, None), replies
    )
    assert [c.endpoint for c in sent] == [
        "/contact/sync",
        "/contacts/{id}/contactLists",
        "/contactLists",
    ]
    assert outcomes[0].known == SUBSCRIBED
