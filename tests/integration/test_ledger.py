"""The applied-state ledger end to end: real broker, emulator and service processes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.adapters.kafka_readers import kafka_log_reader
from service.adapters.ledger_reads import read_all
from service.core.codec import encode_event, load_reader_schema
from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import LocalBroker
from service.devtools.samples import make_samples, produce, subscribed
from tests.conftest import TOKEN
from tests.integration.conftest import FAST
from tests.support.harness import (
    ServiceProcess,
    emulator_lists,
    request_log,
    run_cli,
    service_env,
    wait_for_lag_zero,
)

WRITES = ("POST", "PUT", "DELETE")


def event(
    email: str, action: str, list_name: str = "VIP", at: int = 0, event_id: str = ""
) -> tuple[bytes, bytes]:
    event_id = event_id or str(uuid.uuid4())
    value = encode_event(
        {
            "event_id": event_id,
            "occurred_at": 1_767_225_600_000 + at,
            "email": email,
            "audience_id": "aud-vip",
            "audience_name": list_name,
            "action": action,
            "campaign_id": "spring",
            "treatment_group": "B",
            "attributes": {},
        },
        load_reader_schema(),
    )
    return email.encode(), value


def metric(service: ServiceProcess, name: str) -> float:
    for line in service.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def api(emulator: Emulator, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A change made in AC behind the service's back (another integration, a person)."""
    response = httpx.request(
        method, f"{emulator.url}/api/3/{path}", json=body, headers={"Api-Token": TOKEN}, timeout=10
    )
    assert response.status_code < 300, response.text
    return response.json()  # type: ignore[no-any-return]


def self_unsubscribe(emulator: Emulator, email: str, list_name: str) -> None:
    response = httpx.post(
        f"{emulator.url}/_emulator/self-unsubscribe",
        json={"email": email, "list": list_name},
        headers=emulator.inspection_headers,
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["ok"] is True, response.text


def ledger_entries(bootstrap: str, topic: str) -> dict[str, Any]:
    """The ledger as the broker holds it (assigned reads to the end, no consumer group)."""
    readers = kafka_log_reader({"bootstrap.servers": bootstrap})
    return read_all(readers, f"{topic}.ledger", list(range(6)))


def list_id_of(emulator: Emulator, name: str) -> str:
    state = httpx.get(
        emulator.url + "/_emulator/state", timeout=10, headers=emulator.inspection_headers
    ).json()
    return str(state["lists"][name]["id"])


def test_replay_from_offset_zero_with_a_new_group_makes_zero_ac_writes(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=1500, emails=150, audiences=3, seed=41)
    ends = produce(bootstrap, topic, samples.records)
    first = ServiceProcess(
        service_env(bootstrap, topic, "g-first", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "first",
    ).start()
    services.append(first)
    wait_for_lag_zero(bootstrap, "g-first", topic, ends, timeout=120, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    assert first.terminate() == 0
    writes_before = [r for r in request_log(fast_emulator) if r["method"] in WRITES]
    assert writes_before, "the first pass wrote to AC"
    mark = len(request_log(fast_emulator))

    replay = ServiceProcess(
        service_env(bootstrap, topic, "g-replay", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "replay",
    ).start()
    services.append(replay)
    wait_for_lag_zero(bootstrap, "g-replay", topic, ends, timeout=120, services=[replay])
    after = request_log(fast_emulator)[mark:]
    assert [r for r in after if r["method"] in WRITES] == []
    assert metric(replay, 'ac_sync_changes_skipped_total{reason="already_applied"}') > 0
    assert metric(replay, "ac_sync_ledger_restored_records_total") > 0
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)


def test_exit_then_entry_in_different_windows_ends_subscribed(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    people = [f"back{i}@example.com" for i in range(3)]  # few: the per-contact path
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-back", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "svc",
    ).start()
    services.append(service)
    for step, (action, status) in enumerate((("ENTERED", 1), ("EXITED", 2), ("ENTERED", 1))):
        mark = len(request_log(fast_emulator))
        ends = produce(bootstrap, topic, [event(p, action, at=step * 1000) for p in people])
        wait_for_lag_zero(bootstrap, "g-back", topic, ends, timeout=60, services=services)
        assert emulator_lists(fast_emulator)["VIP"] == {p: status for p in people}, step
    # The re-entry undid our own unsubscribe directly: no status read, one write per person.
    endpoints = [r["endpoint"] for r in request_log(fast_emulator)[mark:]]
    assert endpoints.count("/contactLists") == 3
    assert "/contacts/{id}/contactLists" not in endpoints
    assert "/contact/sync" not in endpoints  # the contact id came from the ledger


@pytest.mark.parametrize(
    ("others", "unsubscribed"),
    [(0, 0), (14, 0), (14, 120)],
    ids=["per-contact", "bulk-import", "bulk-import-list-with-many-unsubscribed"],
)
def test_own_unsubscribe_is_kept_counted_and_explained(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
    others: int,
    unsubscribed: int,
) -> None:
    # Someone else subscribed the person to the list; then the person unsubscribed themselves.
    # With ``unsubscribed`` more people unsubscribed from it than one page holds (it must not
    # matter: no list-wide read is made).
    created = api(
        fast_emulator,
        "POST",
        "lists",
        {
            "list": {
                "name": "VIP",
                "stringid": "vip",
                "sender_url": "https://x.example",
                "sender_reminder": "r",
            }
        },
    )
    list_id = created["list"]["id"]
    contact = api(fast_emulator, "POST", "contact/sync", {"contact": {"email": "Kept@Example.com"}})
    api(
        fast_emulator,
        "POST",
        "contactLists",
        {"contactList": {"list": list_id, "contact": contact["contact"]["id"], "status": 1}},
    )
    self_unsubscribe(fast_emulator, "kept@example.com", "VIP")
    for i in range(unsubscribed):
        gone = api(fast_emulator, "POST", "contact/sync", {"contact": {"email": f"gone{i}@x.com"}})
        api(
            fast_emulator,
            "POST",
            "contactLists",
            {"contactList": {"list": list_id, "contact": gone["contact"]["id"], "status": 2}},
        )

    env = service_env(bootstrap, topic, "g-kept", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    crowd = [f"crowd{i}@example.com" for i in range(others)]
    entered_id = str(uuid.uuid4())
    records = [event("kept@example.com", "ENTERED", event_id=entered_id)]
    records += [event(p, "ENTERED") for p in crowd]
    ends = produce(bootstrap, topic, records)
    wait_for_lag_zero(bootstrap, "g-kept", topic, ends, timeout=60, services=services)

    members = emulator_lists(fast_emulator)["VIP"]
    assert members["kept@example.com"] == 2
    assert all(members[p] == 1 for p in crowd)
    if others:
        # An import never re-subscribes (AC's rule): consent held, but the ledger cannot know
        # whose status 2 that is, and says so. It learns it at the exit, before any write.
        log = request_log(fast_emulator)
        assert any(r["endpoint"] == "/import/bulk_import" for r in log)
        shown = run_cli("explain", "kept@example.com", "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        [vip] = json.loads(shown.stdout)["lists"]
        assert vip["status"] == 1 and vip["verified"] is False and vip["set_by"] == "service"
        assert vip["trust"].startswith("not verified: subscribed by an import")
        assert metric(service, "ac_sync_consent_kept_total") == 0.0
        mark = len(log)
        exit_id = str(uuid.uuid4())
        ends = produce(
            bootstrap, topic, [event("kept@example.com", "EXITED", at=1000, event_id=exit_id)]
        )
        wait_for_lag_zero(bootstrap, "g-kept", topic, ends, timeout=60, services=services)
        after = request_log(fast_emulator)[mark:]
        # one read of the contact's status on the list, and no write: it was already theirs
        assert [r["method"] for r in after] == ["GET"], after
        assert emulator_lists(fast_emulator)["VIP"]["kept@example.com"] == 2
        entered_id = str(uuid.uuid4())
        ends = produce(
            bootstrap, topic, [event("kept@example.com", "ENTERED", at=2000, event_id=entered_id)]
        )
        wait_for_lag_zero(bootstrap, "g-kept", topic, ends, timeout=60, services=services)
        writes = [r for r in request_log(fast_emulator)[mark:] if r["method"] in WRITES]
        assert writes == [], "the person's own unsubscribe was overridden"
        assert emulator_lists(fast_emulator)["VIP"]["kept@example.com"] == 2
    assert metric(service, "ac_sync_consent_kept_total") == 1.0
    assert "kept@example.com" not in service.log_text()

    shown = run_cli("explain", "  KEPT@example.com ", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    [vip] = data["lists"]
    assert vip["list"] == "VIP"
    assert vip["status"] == 2 and vip["consent_kept"] is True and vip["set_by"] == "person"
    assert vip["event"]["event_id"] == entered_id
    assert vip["event"]["audience_id"] == "aud-vip"
    assert vip["event"]["campaign_id"] == "spring" and vip["event"]["treatment_group"] == "B"
    text = run_cli("explain", "kept@example.com", "--list", "VIP", env=env)
    assert text.returncode == 0
    assert "consent kept" in text.stdout and "unsubscribed" in text.stdout
    missing = run_cli("explain", "nobody@example.com", env=env)
    assert missing.returncode == 1 and "no ledger entry" in missing.stdout


def test_kill_9_between_the_ac_write_and_the_ledger_write_ends_exact(
    broker: LocalBroker | str,
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    if isinstance(broker, str):
        pytest.fail("this test pauses the broker process: run it with the local test broker")
    people = [f"gap{i}@example.com" for i in range(6)]  # per contact: sync + contactLists each
    env = service_env(bootstrap, topic, "g-gap", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    wait_until_restored(service)  # in the group, partitions assigned
    # Slow AC answers: the writes take about a second, the broker pause comes within 20 ms.
    set_faults(fast_emulator, {"latency_ms": [400, 500]})
    ends = produce(bootstrap, topic, [event(p, "ENTERED") for p in people])
    deadline = time.monotonic() + 60
    # A subscription (contactLists) is the write a write-ahead announces: the contact's
    # upsert before it is not (it is repeated harmlessly).
    while not [r for r in request_log(fast_emulator) if r["endpoint"] == "/contactLists"]:
        assert time.monotonic() < deadline, "the service sent nothing to AC"
        time.sleep(0.01)
    # Every change is written ahead to the ledger before its AC write; the pause lets the
    # writes already on their way land in AC and stops every later ledger write (the outcome).
    broker.pause()
    try:
        quiet_since, seen = time.monotonic(), len(request_log(fast_emulator))
        deadline = time.monotonic() + 60
        while time.monotonic() - quiet_since < 3.0:  # AC quiet for 3 s: nothing more can go
            assert time.monotonic() < deadline, "AC never went quiet"
            time.sleep(0.1)
            now_seen = len(request_log(fast_emulator))
            if now_seen != seen:
                quiet_since, seen = time.monotonic(), now_seen
        in_ac = {p for p, s in emulator_lists(fast_emulator).get("VIP", {}).items() if s == 1}
        assert in_ac, "AC was not written while the broker was paused"
        service.kill()  # after the AC writes, before any outcome was acknowledged
    finally:
        broker.resume()
    # The gap: AC has them, the ledger holds only the write-ahead (a write that may have landed).
    # (A write answered just before the pause may have had its outcome recorded already.)
    held = ledger_entries(bootstrap, topic)
    assert in_ac <= set(held)  # never in AC without at least the write-ahead
    gap = {p for p in in_ac if held[p].state("VIP").pending_statuses == {1}}
    assert gap, "no AC write was left without its recorded outcome"
    assert all(held[p].state("VIP").status == 1 for p in in_ac - gap)
    set_faults(fast_emulator, {})

    again = ServiceProcess(env, tmp_path / "again").start()
    services.append(again)
    wait_for_lag_zero(bootstrap, "g-gap", topic, ends, timeout=90, services=[again])
    assert emulator_lists(fast_emulator)["VIP"] == {p: 1 for p in people}
    recorded = ledger_entries(bootstrap, topic)
    assert set(recorded) == set(people)
    assert {e.state("VIP").status for e in recorded.values()} == {1}
    assert {e.state("VIP").pending for e in recorded.values()} == {0}  # every outcome known


def set_faults(emulator: Emulator, faults: dict[str, Any]) -> None:
    response = httpx.post(
        emulator.url + "/_emulator/faults",
        json=faults,
        timeout=10,
        headers=emulator.inspection_headers,
    )
    assert response.status_code == 200, response.text


def restores(service: ServiceProcess) -> list[tuple[str, list[int], int]]:
    """(message, partitions, records) of the assignment and restore log lines, in order."""
    found = []
    for line in service.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") in ("partitions assigned", "ledger restored"):
            found.append((record["msg"], record["partitions"], record.get("records", 0)))
    return found


def wait_until_restored(service: ServiceProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(m == "ledger restored" for m, _, _ in restores(service)):
        assert service.alive(), service.log_text()[-2000:]
        assert time.monotonic() < deadline, "no partitions assigned and restored"
        time.sleep(0.2)


def test_two_replicas_restore_only_their_partitions(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    env = service_env(bootstrap, topic, "g-two", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    first_batch = make_samples(events=600, emails=120, audiences=2, seed=51)
    ends = produce(bootstrap, topic, first_batch.records)
    seed = ServiceProcess(env, tmp_path / "seed").start()
    services.append(seed)
    wait_for_lag_zero(bootstrap, "g-two", topic, ends, timeout=120, services=services)
    assert seed.terminate() == 0

    second = make_samples(events=1500, emails=120, audiences=2, seed=52, start_ms=1_800_000_000_000)
    a = ServiceProcess(env, tmp_path / "a").start()
    services.append(a)
    wait_until_restored(a)
    b = ServiceProcess(env, tmp_path / "b").start()
    services.append(b)
    wait_until_restored(b)  # a gave up half of its partitions to b
    ends = produce(bootstrap, topic, second.records)
    wait_for_lag_zero(bootstrap, "g-two", topic, ends, timeout=180, services=[a, b])
    expected = {name: dict(members) for name, members in first_batch.expected.items()}
    for name, members in second.expected.items():
        expected.setdefault(name, {}).update(members)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(expected)

    restored_by = []
    for replica in (a, b):
        events = restores(replica)
        restored = [p for message, p, _ in events if message == "ledger restored"]
        assigned = [p for message, p, _ in events if message == "partitions assigned" and p]
        assert restored and restored == assigned, events  # every assignment, and only it
        assert sum(records for m, _, records in events if m == "ledger restored") > 0
        restored_by.append({p for group in restored for p in group})
    # b joined while a held everything: b restored only the partitions it was given
    assert restored_by[0] == set(range(6))
    assert 0 < len(restored_by[1]) < 6


def test_reconcile_reports_changes_made_behind_the_services_back(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    people = [f"rec{i}@example.com" for i in range(4)]
    env = service_env(bootstrap, topic, "g-rec", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    ends = produce(bootstrap, topic, [event(p, "ENTERED") for p in people])
    wait_for_lag_zero(bootstrap, "g-rec", topic, ends, timeout=60, services=services)
    assert service.terminate() == 0

    agree = run_cli("reconcile", "--list", "VIP", env=env)
    assert agree.returncode == 0, agree.stdout + agree.stderr
    assert "0 difference(s)" in agree.stdout

    self_unsubscribe(fast_emulator, "rec1@example.com", "VIP")  # the person, from an email footer
    list_id = list_id_of(fast_emulator, "VIP")
    stranger = api(
        fast_emulator, "POST", "contact/sync", {"contact": {"email": "manual@example.com"}}
    )
    api(
        fast_emulator,
        "POST",
        "contactLists",  # a marketer adds someone by hand
        {"contactList": {"list": list_id, "contact": stranger["contact"]["id"], "status": 1}},
    )
    mark = len(request_log(fast_emulator))

    found = run_cli("reconcile", "--list", "VIP", "--json", env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    by_email = {d["email"]: d for d in report["differences"]}
    assert set(by_email) == {"rec1@example.com", "manual@example.com"}
    assert by_email["rec1@example.com"]["ledger"] == "subscribed"
    assert by_email["rec1@example.com"]["ac"] == "unsubscribed"
    assert by_email["manual@example.com"]["ledger"] == "none"
    assert by_email["manual@example.com"]["ac"] == "subscribed"
    # read-only: only GETs reached AC
    assert {r["method"] for r in request_log(fast_emulator)[mark:]} == {"GET"}
    assert emulator_lists(fast_emulator)["VIP"]["rec1@example.com"] == 2


def test_import_budget_history_travels_in_the_ledger_and_stays_out_of_its_entries(
    bootstrap: str,
) -> None:
    """A partition's import-budget history is written to its ledger partition and read back by
    the next owner's restore (the latest record wins); entries, ``explain`` and ``reconcile``
    never see it."""
    from confluent_kafka import Producer

    from service.adapters.kafka import AckedProducer
    from service.adapters.ledger_store import LedgerStore
    from service.core.ledger import LedgerEntry, ListState, SetBy
    from service.devtools.localbroker import create_topics

    name = f"ledger-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {name: 2}, {"cleanup.policy": "compact"})
    config = {"bootstrap.servers": bootstrap, "group.id": f"g-{name}"}
    producer = AckedProducer(Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True}))
    readers = kafka_log_reader(config)
    store = LedgerStore(name, producer, readers)
    entry = LedgerEntry(
        "42", 0, (ListState("VIP", 1, SetBy.SERVICE, str(uuid.uuid4()), 1, 2, 0, 3, "a", "VIP"),)
    )
    written: list[str] = []
    store.write_budget(0, [(1000.25, 0.5)])
    store.write(0, "pat@example.com", entry, lambda: written.append("entry"))
    store.write_budget(0, [(1000.25, 0.5), (1001.5, 1.0)])  # the latest wins
    assert producer.flush(10)
    assert written == ["entry"]

    next_owner = LedgerStore(name, producer, readers)
    next_owner.start_restore([0, 1])
    stats = None
    while stats is None:
        stats = next_owner.restore_step(1.0)
    assert next_owner.budgets == {0: [(1000.25, 0.5), (1001.5, 1.0)]}
    assert stats.emails == 1
    assert next_owner.get(0, "pat@example.com") == entry
    assert read_all(readers, name, [0, 1]) == {"pat@example.com": entry}
