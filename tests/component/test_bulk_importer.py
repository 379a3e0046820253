"""AC's calls (``service/core/acapi.py``, ``bulk.py``, ``lists.py``) driven over HTTP against
the emulator, every request and answer checked against AC's OpenAPI description."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.adapters.ac_http import HttpDriver
from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
from service.core import acapi
from service.core.bulk import contact_entry, submit_import, verify_exits
from service.core.coalesce import ListRef
from service.core.errors import PermanentApiError, RateLimited
from service.core.lists import resolve_list
from service.devtools.emulator.server import Emulator
from service.metrics import Metrics
from tests.conftest import TOKEN
from tests.support.openapi import ValidatingTransport

T = TypeVar("T")


@pytest.fixture
def fast() -> Iterator[Emulator]:
    emu = Emulator(tokens={TOKEN}, rate_limit=1000, import_delay=0.2, seed=4).start()
    try:
        yield emu
    finally:
        emu.stop()


class Ac:
    def __init__(self, emu: Emulator) -> None:
        self.validating = ValidatingTransport(httpx.HTTPTransport())
        transport = RateLimitedTransport(self.validating, RateLimiter(1000, guard=0.0))
        self.http = httpx.Client(base_url=emu.url + "/api/3/", transport=transport, timeout=10)
        self.driver = HttpDriver(self.http, lambda: TOKEN, Metrics(CollectorRegistry()))

    def __call__(self, work: acapi.Call[T]) -> T:
        return acapi.run_sync(work, self.driver.send)

    def list_id(self, name: str) -> str:
        return self(
            resolve_list(
                ListRef(name=name), create=True, sender_url="https://x.test", sender_reminder="r"
            )
        )


@pytest.fixture
def ac(fast: Emulator) -> Iterator[Ac]:
    client = Ac(fast)
    yield client
    client.http.close()
    assert client.validating.errors == []


def completed(ac: Ac, batch_id: str) -> acapi.ImportStatus:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = ac(acapi.import_info(batch_id))
        if status.completed:
            return status
        time.sleep(0.1)
    raise AssertionError("import never completed")


def members(emu: Emulator, name: str) -> dict[str, int]:
    with emu.account.lock:
        return emu.account.snapshot(time.time())["lists"][name]["members"]  # type: ignore[no-any-return]


def entry(email: str, lists: dict[str, int], **fields: str) -> dict[str, Any]:
    return contact_entry(email, lists, fields, {})


def test_import_applies_lists_and_validates_against_openapi(fast: Emulator, ac: Ac) -> None:
    vip, news = ac.list_id("VIP"), ac.list_id("News")
    entries = [entry(f"p{i}@example.com", {vip: 1, news: 1}, firstName="P") for i in range(20)]
    entries += [entry(f"q{i}@example.com", {vip: 2}) for i in range(5)]
    result = ac(submit_import(entries))
    assert result.error is None and result.batch_id and result.sent == list(range(25))
    status = completed(ac, result.batch_id)
    assert len(status.success_ids) == 25 and status.failed_emails == []
    assert members(fast, "VIP") == {
        **{f"p{i}@example.com": 1 for i in range(20)},
        **{f"q{i}@example.com": 2 for i in range(5)},
    }
    assert ac.validating.checked >= 4


def test_one_malformed_email_is_set_aside_and_the_rest_sent_again(fast: Emulator, ac: Ac) -> None:
    """AC's validator may be stricter than ours: its 400 names the contact by index."""
    vip = ac.list_id("VIP")
    entries = [entry(f"p{i}@example.com", {vip: 1}) for i in range(12)]
    entries.insert(5, entry("not-an-email", {vip: 1}))
    result = ac(submit_import(entries))
    assert result.rejected == [5] and result.batch_id and len(result.sent) == 12
    completed(ac, result.batch_id)
    assert len(members(fast, "VIP")) == 12
    statuses = [r.status for r in fast.account.log if r.endpoint == "/import/bulk_import"]
    assert statuses[-2:] == [400, 200]


def test_import_rate_limit_is_backpressure(ac: Ac) -> None:
    vip = ac.list_id("VIP")
    for i in range(100):
        pair = [entry(f"a{i}@example.com", {vip: 1}), entry(f"b{i}@example.com", {vip: 1})]
        assert ac(submit_import(pair)).batch_id
    result = ac(
        submit_import([entry("late@example.com", {vip: 1}), entry("l2@example.com", {vip: 1})])
    )
    assert isinstance(result.error, RateLimited) and result.error.status == 400
    assert result.rejected == [] and result.sent == [0, 1]


def test_excluded_email_is_reported_as_a_failure(fast: Emulator, ac: Ac) -> None:
    vip = ac.list_id("VIP")
    with fast.account.lock:
        fast.account.exclusions.add("p3@example.com")
    result = ac(submit_import([entry(f"p{i}@example.com", {vip: 1}) for i in range(10)]))
    assert result.batch_id
    assert completed(ac, result.batch_id).failed_emails == ["p3@example.com"]


def test_import_summary_counts_what_is_still_to_process(fast: Emulator, ac: Ac) -> None:
    vip = ac.list_id("VIP")
    with fast.account.lock:
        fast.account.faults.import_stuck_ratio = 1.0
    ac(submit_import([entry(f"p{i}@example.com", {vip: 1}) for i in range(3)]))
    assert ac(acapi.imports_outstanding()) == 1
    with fast.account.lock:
        for batch in fast.account.imports.values():
            batch.stuck = False
    time.sleep(0.3)
    assert ac(acapi.imports_outstanding()) == 0


def test_verify_exits_finds_who_is_still_subscribed(fast: Emulator, ac: Ac) -> None:
    vip = ac.list_id("VIP")
    ids = {}
    for i in range(130):
        email = f"m{i}@example.com"
        ids[email] = ac(acapi.sync_contact(email, {}, {})).contact_id
        ac(acapi.set_list_status(ids[email], vip, 1))
    for i in range(0, 130, 10):  # every tenth opted out themselves
        with fast.account.lock:
            assert fast.account.self_unsubscribe(f"m{i}@example.com", "VIP")
    asked: dict[str, str | None] = {e: cid for e, cid in ids.items()}
    asked["m1@example.com"] = None  # id unknown: asked by email
    before = len(fast.account.log)
    found = ac(verify_exits(vip, asked))
    assert set(found.subscribed) == {f"m{i}@example.com" for i in range(130) if i % 10}
    assert found.subscribed["m1@example.com"] == ids["m1@example.com"]
    assert len(fast.account.log) - before == found.reads == 2 + 1


def test_members_pages_by_id_and_lists_are_found_or_created_once(fast: Emulator, ac: Ac) -> None:
    big = ac.list_id("Big")
    assert ac.list_id("Big") == big  # found, not created again
    ids = {}
    for i in range(230):
        email = f"m{i}@example.com"
        ids[email] = ac(acapi.sync_contact(email, {}, {})).contact_id
        ac(acapi.set_list_status(ids[email], big, 1 if i % 3 else 2))
    subscribed = ac(acapi.members(big, 1))
    assert subscribed == {e: ids[e] for i, e in enumerate(ids) if i % 3}  # pages of 100
    assert ac(acapi.list_exists(big)) is True
    with fast.account.lock:
        assert fast.account.delete_list("Big")
    assert ac(acapi.list_exists(big)) is False


def test_a_list_that_cannot_be_created_is_refused_clearly(ac: Ac) -> None:
    with pytest.raises(PermanentApiError) as refused:
        ac(
            resolve_list(
                ListRef(name="Nope"), create=False, sender_url="https://x.test", sender_reminder="r"
            )
        )
    assert refused.value.code == "list_missing"
    with pytest.raises(PermanentApiError):
        ac(
            resolve_list(
                ListRef(list_id="999"),
                create=True,
                sender_url="https://x.test",
                sender_reminder="r",
            )
        )
