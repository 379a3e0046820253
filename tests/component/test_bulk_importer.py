"""The bulk importer against the emulator over sockets, every request checked against AC's OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.adapters.activecampaign import ActiveCampaignClient
from service.adapters.bulk import BulkImporter, Group
from service.adapters.lists import ListDirectory
from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
from service.core.coalesce import ListRef, PendingChange
from service.core.errors import RateLimited
from service.core.ledger import Plan
from service.core.model import Action, MembershipEvent
from service.devtools.emulator.server import Emulator
from service.metrics import Metrics
from tests.conftest import TOKEN
from tests.support.openapi import ValidatingTransport


@pytest.fixture
def fast() -> Iterator[Emulator]:
    emu = Emulator(tokens={TOKEN}, rate_limit=1000, import_delay=0.2, seed=4).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def importer(fast: Emulator) -> Iterator[tuple[BulkImporter, ValidatingTransport]]:
    validating = ValidatingTransport(httpx.HTTPTransport())
    transport = RateLimitedTransport(validating, RateLimiter(1000))
    with httpx.Client(base_url=fast.url + "/api/3/", transport=transport, timeout=10) as http:
        client = ActiveCampaignClient(http, lambda: TOKEN, Metrics(CollectorRegistry()))
        yield (
            BulkImporter(
                client, ListDirectory(client, create=True), {"first_name": "firstName"}, {}
            ),
            validating,
        )


def group(email: str, action: Action = Action.ENTERED, lists: tuple[str, ...] = ("VIP",)) -> Group:
    changes = [
        PendingChange(
            0,
            email,
            ListRef(name=name),
            MembershipEvent("e", 0, email, "a", name, action, attributes={"first_name": "Pat"}),
            None,
            [i],
            0.0,
            0.0,
        )
        for i, name in enumerate(lists)
    ]
    return Group(email, changes)


def completed(importer: BulkImporter, batch_id: str) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = importer.client.import_info(batch_id)
        if status.completed:
            return status.success_ids, status.failed_emails
        time.sleep(0.1)
    raise AssertionError("import never completed")


def members(emu: Emulator, name: str) -> dict[str, int]:
    return httpx.get(emu.url + "/_emulator/state", headers=emu.inspection_headers).json()["lists"][
        name
    ]["members"]  # type: ignore[no-any-return]


def test_import_applies_lists_and_validates_against_openapi(
    fast: Emulator, importer: tuple[BulkImporter, ValidatingTransport]
) -> None:
    bulk, validating = importer
    groups = [group(f"p{i}@example.com", lists=("VIP", "News")) for i in range(20)]
    groups += [group(f"q{i}@example.com", Action.EXITED) for i in range(5)]
    result = bulk.submit(groups)
    assert result.error is None and result.batch_id
    assert len(result.sent) == 25
    success, failure = completed(bulk, result.batch_id)
    assert len(success) == 25 and failure == []
    assert members(fast, "VIP") == {
        **{f"p{i}@example.com": 1 for i in range(20)},
        **{f"q{i}@example.com": 2 for i in range(5)},
    }
    assert validating.errors == []
    assert validating.checked >= 4


def test_one_malformed_email_is_set_aside_and_the_rest_sent_again(
    fast: Emulator, importer: tuple[BulkImporter, ValidatingTransport]
) -> None:
    """AC's validator may be stricter than ours: its 400 names the contact by index."""
    bulk, _ = importer
    groups = [group(f"p{i}@example.com") for i in range(12)]
    groups.insert(5, group("not-an-email"))
    result = bulk.submit(groups)
    assert [g.email for g in result.rejected] == ["not-an-email"]
    assert result.batch_id and len(result.sent) == 12
    completed(bulk, result.batch_id)
    assert len(members(fast, "VIP")) == 12
    statuses = [
        r["status"]
        for r in httpx.get(
            fast.url + "/_emulator/requests", headers=fast.inspection_headers
        ).json()["requests"]
        if r["endpoint"] == "/import/bulk_import"
    ]
    assert statuses == [400, 200]


def test_what_does_not_fit_under_400000_bytes_waits_for_the_next_import(
    fast: Emulator, importer: tuple[BulkImporter, ValidatingTransport]
) -> None:
    """250 contacts with long names (~2 KB each) are over AC's size limit, which would refuse
    the whole import: the importer sends what fits and hands back the rest, none refused."""
    bulk, _ = importer
    groups = [group(f"p{i}@example.com") for i in range(250)]
    for g in groups:
        g.changes[0].event = g.changes[0].event._replace(attributes={"first_name": "P" * 2000})
    result = bulk.submit(groups)
    assert result.batch_id and result.requests == 1
    assert 150 < len(result.sent) < 250
    assert [g.email for g in result.sent + result.unsent] == [g.email for g in groups]
    assert result.rejected == [] and result.failed == [] and result.error is None
    completed(bulk, result.batch_id)
    assert len(members(fast, "VIP")) == len(result.sent)


def test_import_rate_limit_is_backpressure(
    fast: Emulator, importer: tuple[BulkImporter, ValidatingTransport]
) -> None:
    bulk, _ = importer
    for i in range(100):
        assert bulk.submit([group(f"a{i}@example.com"), group(f"b{i}@example.com")]).batch_id
    result = bulk.submit([group("late@example.com"), group("later@example.com")])
    assert isinstance(result.error, RateLimited)
    assert result.error.status == 400
    assert result.rejected == [] and result.failed == []
    assert [g.email for g in result.sent] == ["late@example.com", "later@example.com"]


def test_excluded_email_is_reported_as_a_failure(
    fast: Emulator, importer: tuple[BulkImporter, ValidatingTransport]
) -> None:
    bulk, _ = importer
    httpx.post(
        fast.url + "/_emulator/exclusions",
        json={"emails": ["p3@example.com"]},
        headers=fast.inspection_headers,
    )
    result = bulk.submit([group(f"p{i}@example.com") for i in range(10)])
    assert result.batch_id
    _, failure = completed(bulk, result.batch_id)
    assert failure == ["p3@example.com"]


def first_entry(email: str) -> Group:
    g = group(email)
    for change in g.changes:
        change.plan = Plan.FIRST_ENTRY
    return g


def opted_out_after_import(
    bulk: BulkImporter, fast: Emulator, list_name: str, others: int
) -> tuple[set[str], int]:
    """A person who opted out of ``list_name`` enters it again, with ``others`` new contacts,
    in one import. Returns what ``opted_out`` finds and the GET /contacts calls it made."""
    client = bulk.client
    target = ListRef(name=list_name)
    list_id = bulk.lists.list_id(target)
    opted_out = client.sync_contact("optout@example.com", {}, {})
    client.set_list_status(opted_out, list_id, 1)
    with fast.account.lock:
        assert fast.account.self_unsubscribe("optout@example.com", list_name)
    groups = [first_entry("optout@example.com")] + [
        first_entry(f"new{i}@example.com") for i in range(others)
    ]
    for g in groups:
        for change in g.changes:
            change.target = target
    submitted = bulk.submit(groups)
    assert submitted.batch_id is not None
    success, failure = completed(bulk, submitted.batch_id)
    assert failure == [] and len(success) == others + 1
    before = len(
        httpx.get(fast.url + "/_emulator/requests", headers=fast.inspection_headers).json()[
            "requests"
        ]
    )
    kept = bulk.opted_out(target, {g.email for g in groups}, success)
    log = httpx.get(fast.url + "/_emulator/requests", headers=fast.inspection_headers).json()[
        "requests"
    ][before:]
    return kept, sum(1 for r in log if r["endpoint"] == "/contacts")


def test_opted_out_reads_one_page_of_a_fresh_list(
    importer: tuple[BulkImporter, ValidatingTransport], fast: Emulator
) -> None:
    bulk, validating = importer
    kept, reads = opted_out_after_import(bulk, fast, "VIP", 11)
    assert kept == {"optout@example.com"}
    assert reads == 1  # the list's whole unsubscribed set, whatever the number of contacts
    assert validating.errors == []


def test_opted_out_asks_by_id_when_the_list_has_many_unsubscribed(
    importer: tuple[BulkImporter, ValidatingTransport], fast: Emulator
) -> None:
    bulk, validating = importer
    client = bulk.client
    list_id = bulk.lists.list_id(ListRef(name="Old"))
    for i in range(120):  # more unsubscribed members than one page holds
        contact = client.sync_contact(f"gone{i}@example.com", {}, {})
        client.set_list_status(contact, list_id, 2)
    kept, reads = opted_out_after_import(bulk, fast, "Old", 240)
    assert kept == {"optout@example.com"}
    assert reads == 1 + 1  # the page that showed 121 unsubscribed, then one query by 241 ids
    assert bulk.unsubscribed[list_id] == 121
    kept, reads = opted_out_after_import(bulk, fast, "Old", 10)
    assert kept == {"optout@example.com"} and reads == 1  # known to be large: ids at once
    assert validating.errors == []


def test_list_members_pages_and_narrows_by_id(
    importer: tuple[BulkImporter, ValidatingTransport], fast: Emulator
) -> None:
    bulk, validating = importer
    client = bulk.client
    list_id = bulk.lists.list_id(ListRef(name="Big"))
    ids = {}
    for i in range(230):
        email = f"m{i}@example.com"
        ids[email] = client.sync_contact(email, {}, {})
        client.set_list_status(ids[email], list_id, 1 if i % 3 else 2)
    subscribed = client.list_members(list_id, 1)
    assert set(subscribed) == {e for i, e in enumerate(ids) if i % 3}  # three pages of 100
    assert subscribed == {e: ids[e] for e in subscribed}
    some = [ids["m0@example.com"], ids["m1@example.com"], ids["m3@example.com"]]
    assert set(client.list_members(list_id, 2, some)) == {"m0@example.com", "m3@example.com"}
    assert validating.errors == []
