"""The dry run's pure parts (``service/core/preview.py``) and its edges
(``service/adapters/preview.py``): writes answered locally in AC's shapes, reads sent and
corrected, the report's aggregation. AC is the emulator's ``Account`` (no sockets)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.adapters.kafka import AckedProducer
from service.adapters.preview import DiscardingProducer, EndWatch
from service.core import acapi
from service.core.acapi import ApiCall, Call, Reply, run_sync
from service.core.bulk import contact_entry, submit_import, verify_exits
from service.core.errors import AuthRejected, PermanentApiError
from service.core.ledger import OPTED_OUT, SUBSCRIBED, UNSUBSCRIBED_BY_US, Plan
from service.core.preview import Shadow, Wrote, is_preview_id, previewed
from service.core.preview_report import (
    CATEGORIES,
    KEEP_OPT_OUT,
    PARK,
    SAMPLE_SIZE,
    SKIP,
    SUBSCRIBE,
    UNSUBSCRIBE,
    PreviewReport,
    classify,
)
from service.devtools.emulator.state import Account
from service.metrics import Metrics

TOKEN = "unit-token"


class FakeAC:
    """The emulator's account behind ``send``, one request a second (under its limit), with
    the log of what reached it."""

    def __init__(self) -> None:
        self.account = Account({TOKEN}, import_delay=0.0, seed=1)
        self.http = httpx.Client(base_url="http://ac.test/api/3/")
        self.now = 1_000_000.0
        self.sent: list[ApiCall] = []

    def send(self, call: ApiCall) -> Reply:
        self.sent.append(call)
        self.now += 1.0
        request = self.http.build_request(
            call.method, call.path, params=list(call.params) or None, json=call.body
        )
        answer = self.account.handle(
            call.method,
            request.url.path,
            request.url.query.decode(),
            {"api-token": TOKEN},
            request.content,
            self.now,
        )
        return Reply(answer.status, "application/json", json.dumps(answer.body).encode())

    def real(self, work: Call[Any]) -> Any:
        """Run a call for real (setting AC up)."""
        return run_sync(work, self.send)

    def state(self) -> Any:
        return self.account.snapshot(self.now)


@pytest.fixture
def ac() -> FakeAC:
    return FakeAC()


def dry(shadow: Shadow, ac: FakeAC) -> Callable[[Call[Any]], Any]:
    def run(work: Call[Any]) -> Any:
        return run_sync(previewed(work, shadow), ac.send)

    return run


def synced_id(email: str, fields: dict[str, str], custom: dict[str, str]) -> Call[str]:
    synced = yield from acapi.sync_contact(email, fields, custom)
    return synced.contact_id


def test_writes_are_answered_locally_and_reads_see_them(ac: FakeAC) -> None:
    known = ac.real(synced_id("known@example.com", {}, {}))
    shadow = Shadow()
    run = dry(shadow, ac)
    before = ac.state()

    list_id = run(acapi.create_list("Preview List", "preview-list", "https://a.test", "r"))
    assert is_preview_id(list_id)
    assert run(acapi.find_list("Preview List")) == list_id  # AC has none: the shadow's
    assert run(acapi.list_exists(list_id)) is True
    synced = run(acapi.sync_contact("known@example.com", {"firstName": "K"}, {}))
    assert synced == acapi.Synced(known, created=False)  # AC has it: answered as an update
    created = run(acapi.sync_contact("new@example.com", {}, {}))
    assert created.created  # AC has none: answered as a creation (on no list yet)
    new = created.contact_id
    assert is_preview_id(new)
    run(acapi.set_list_status(new, list_id, 1))
    run(acapi.set_list_status(known, list_id, 1))
    memberships = run(acapi.contact_lists(new))
    assert {k: m.status for k, m in memberships.items()} == {list_id: 1}
    page = run(acapi.contacts_page(list_id=list_id, status=1, ids=[known, new]))
    assert page.contacts == {"known@example.com": known, "new@example.com": new}

    assert ac.state() == before
    assert {c.method for c in ac.sent[1:]} == {"GET"}
    # Reads that name what only the run made never reach AC.
    assert all(list_id not in json.dumps(c.params) for c in ac.sent)
    assert all(new not in json.dumps(c.params) + c.path for c in ac.sent)
    assert shadow.writes == {"POST /lists": 1, "POST /contact/sync": 2, "POST /contactLists": 2}
    assert shadow.created == ["Preview List"]
    # One read for the known email's id; the new one was asked once too, then never again.
    assert shadow.reads["GET /contacts"] == 2
    run(synced_id("new@example.com", {}, {}))
    assert shadow.reads["GET /contacts"] == 2


def test_a_membership_the_run_set_wins_over_acs_in_every_read(ac: FakeAC) -> None:
    list_id = ac.real(acapi.create_list("L", "l", "https://a.test", "r"))
    one = ac.real(synced_id("one@example.com", {}, {}))
    two = ac.real(synced_id("two@example.com", {}, {}))
    ac.real(acapi.set_list_status(one, list_id, 1))
    ac.real(acapi.set_list_status(two, list_id, 2))
    shadow = Shadow()
    run = dry(shadow, ac)
    run(acapi.set_list_status(one, list_id, 2))  # the run unsubscribes one, subscribes two
    run(acapi.set_list_status(two, list_id, 1))
    # Two's id came from the ledger: the run learns whose it is when the change is recorded.
    assert shadow.wrote("two@example.com", two, list_id) == Wrote(1, False)

    subscribed = run(acapi.contacts_page(list_id=list_id, status=1, ids=[one, two]))
    assert subscribed.contacts == {"two@example.com": two}
    assert subscribed.total == 1
    assert run(acapi.members(list_id, 2)) == {"one@example.com": one}
    assert {k: m.status for k, m in run(acapi.contact_lists(one)).items()} == {list_id: 2}
    verified = run(verify_exits(list_id, {"one@example.com": one, "two@example.com": None}))
    assert verified.subscribed == {"two@example.com": two}
    assert ac.state()["lists"]["L"]["members"] == {"one@example.com": 1, "two@example.com": 2}


def test_imports_are_answered_completed_and_never_resubscribe_an_unsubscribe(
    ac: FakeAC,
) -> None:
    list_id = ac.real(acapi.create_list("L", "l", "https://a.test", "r"))
    shadow = Shadow()
    run = dry(shadow, ac)
    gone = run(synced_id("gone@example.com", {}, {}))
    run(acapi.set_list_status(gone, list_id, 2))
    entries = [
        contact_entry("a@example.com", {list_id: 1}, {"firstName": "A"}, {}),
        contact_entry("gone@example.com", {list_id: 1}, {}, {}),
        contact_entry("b@example.com", {list_id: 2}, {}, {}),
    ]
    submitted = run(submit_import(entries))
    assert submitted.batch_id and submitted.sent == [0, 1, 2]
    status = run(acapi.import_info(submitted.batch_id))
    assert status.completed and len(status.success_ids) == 3 and status.failed_emails == []
    learned = run(acapi.contacts_page(ids=status.success_ids))
    assert set(learned.contacts) == {"a@example.com", "gone@example.com", "b@example.com"}
    members = run(acapi.members(list_id, 1))
    assert set(members) == {"a@example.com"}  # gone's 2 stands, as AC's imports leave it
    assert shadow.imported_contacts == 3
    assert shadow.writes["POST /import/bulk_import"] == 1
    assert ac.state()["imports"] == {}
    assert {c.method for c in ac.sent[1:]} == {"GET"}
    assert shadow.wrote("a@example.com", None, list_id) == Wrote(1, True)
    assert shadow.wrote("a@example.com", None, list_id) is None  # paired once
    assert shadow.wrote("b@example.com", None, list_id) == Wrote(2, True)


def test_a_write_by_contact_id_pairs_with_its_email_or_its_id(ac: FakeAC) -> None:
    shadow = Shadow()
    run = dry(shadow, ac)
    run(acapi.set_list_status("77", "5", 2))  # an id the run never saw an email for
    assert shadow.wrote("x@example.com", None, "5") is None
    assert shadow.wrote("x@example.com", "77", "5") == Wrote(2, False)
    cid = run(synced_id("y@example.com", {}, {}))
    run(acapi.set_list_status(cid, "5", 1))
    assert shadow.wrote("y@example.com", None, "5") == Wrote(1, False)
    assert shadow.wrote("y@example.com", cid, None) is None


def test_an_unknown_write_never_leaves_and_is_refused(ac: FakeAC) -> None:
    shadow = Shadow()
    call = ApiCall("DELETE", "/contacts/{id}", "contacts/5")
    with pytest.raises(PermanentApiError) as info:
        dry(shadow, ac)(acapi.request(call))
    assert info.value.code == "dry_run"
    assert ac.sent == []


def test_acs_errors_on_reads_mean_what_they_mean(ac: FakeAC) -> None:
    ac.account.faults.auth_failure = True
    with pytest.raises(AuthRejected):
        dry(Shadow(), ac)(acapi.find_list("L"))
    with pytest.raises(AuthRejected):  # a contact/sync becomes a read, refused alike
        dry(Shadow(), ac)(acapi.sync_contact("a@example.com", {}, {}))


@pytest.mark.parametrize(
    ("plan", "status", "known", "wrote", "expected"),
    [
        (Plan.FIRST_ENTRY, 1, SUBSCRIBED, Wrote(1, True), SUBSCRIBE),
        (Plan.RESUBSCRIBE, 1, SUBSCRIBED, Wrote(1, False), SUBSCRIBE),
        (Plan.UNSUBSCRIBE, 2, UNSUBSCRIBED_BY_US, Wrote(2, False), UNSUBSCRIBE),
        (Plan.FIRST_ENTRY, 1, SUBSCRIBED, None, SKIP),  # AC already had it: nothing sent
        (Plan.FIRST_ENTRY, 1, OPTED_OUT, None, KEEP_OPT_OUT),
        (Plan.CONSENT_KEPT, 1, None, None, KEEP_OPT_OUT),
        (Plan.SKIP, 2, None, None, SKIP),
        (Plan.EXIT, 2, OPTED_OUT, None, SKIP),  # an exit of someone already out
    ],
)
def test_classify(plan: Plan, status: int, known: Any, wrote: Any, expected: str) -> None:
    assert classify(plan, status, known, wrote) == expected


def test_the_report_aggregates_per_list_with_bounded_unique_samples() -> None:
    report = PreviewReport()
    for n in range(8):
        report.add("A", SUBSCRIBE, f"h{n}")
    report.add("A", SUBSCRIBE, "h0")
    report.add("A", SKIP, "h9")
    report.add("B", KEEP_OPT_OUT, "k1")
    report.park("B", "list_missing", "p1")
    report.park(None, "invalid_email", "r1")
    report.park(None, "undecodable", None)
    shadow = Shadow(created=["B"])
    shadow.writes["POST /lists"] += 1
    data = report.summary(shadow)

    a, b = data["lists"]["A"], data["lists"]["B"]
    assert {c: a[c] for c in CATEGORIES} == {
        SUBSCRIBE: 9,
        UNSUBSCRIBE: 0,
        KEEP_OPT_OUT: 0,
        SKIP: 1,
        PARK: 0,
    }
    assert a["samples"][SUBSCRIBE] == [f"h{n}" for n in range(SAMPLE_SIZE)]
    assert a["created"] is False and b["created"] is True
    assert (b[KEEP_OPT_OUT], b[PARK], b["parked_by_reason"]) == (1, 1, {"list_missing": 1})
    assert data["records_parked"] == {
        "total": 2,
        "by_reason": {"invalid_email": 1, "undecodable": 1},
        "samples": ["r1"],
    }
    assert data["writes_not_sent"] == {"POST /lists": 1}
    assert report.totals() == {
        SUBSCRIBE: 9,
        UNSUBSCRIBE: 0,
        KEEP_OPT_OUT: 1,
        SKIP: 1,
        PARK: 3,
    }
    json.dumps(data)  # JSON-ready


def test_kafka_writes_are_acknowledged_and_never_sent() -> None:
    kafka = DiscardingProducer()
    acked = AckedProducer(kafka)
    done: list[str] = []
    acked.send("t.ledger", 0, b"k", b"v", lambda: done.append("ledger"), lambda r: True)
    acked.send("t.dlq", -1, b"k", b"v", lambda: done.append("dlq"), lambda r: True, headers=[])
    assert done == [] and not acked.idle
    acked.poll()
    assert done == ["ledger", "dlq"] and acked.idle
    assert kafka.produced == {"t.ledger": 1, "t.dlq": 1}


class _Error:
    def __init__(self, code: int) -> None:
        self._code = code

    def code(self) -> int:
        return self._code


class _Message:
    def __init__(self, partition: int, eof: bool = False) -> None:
        self._partition, self._eof = partition, eof

    def error(self) -> _Error | None:
        from confluent_kafka import KafkaError

        return _Error(KafkaError._PARTITION_EOF) if self._eof else None

    def partition(self) -> int:
        return self._partition


class _Consumer:
    def __init__(self, batches: list[list[_Message]]) -> None:
        self.batches = batches

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[_Message]:
        return self.batches.pop(0) if self.batches else []


def test_the_end_of_each_partition_is_the_last_thing_read_of_it() -> None:
    watch = EndWatch(_Consumer([[_Message(0), _Message(0, eof=True), _Message(1)]]))  # type: ignore[arg-type]
    watch.consume(10, 0)
    assert watch.read_to_end([0]) and not watch.read_to_end([0, 1])
    assert not watch.read_to_end([2])  # never heard of: not read
    watch.inner.batches = [[_Message(1, eof=True), _Message(0)]]  # type: ignore[attr-defined]
    watch.consume(10, 0)
    assert watch.read_to_end([1]) and not watch.read_to_end([0])
    assert watch.records == 3


def test_build_info_says_dry_run() -> None:
    registry = CollectorRegistry()
    Metrics(registry, dry_run=True)
    samples = [s for m in registry.collect() if m.name == "ac_sync_build_info" for s in m.samples]
    assert [s.labels["dry_run"] for s in samples] == ["true"]
    other = CollectorRegistry()
    Metrics(other)
    assert ['dry_run="false"' in line for line in _exposition(other) if "build_info{" in line] == [
        True
    ]


def _exposition(registry: CollectorRegistry) -> list[str]:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode().splitlines()
