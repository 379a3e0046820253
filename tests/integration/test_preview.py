"""``run --dry-run`` end to end (README "Preview"): the real broker, the emulator over sockets,
the CLI as an operator runs it. After a dry run AC is exactly as before (only reads reached
it), the ledger and the DLQ hold not one record more, the live group's offsets are untouched,
and the report says per list what the service would have done with the events."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer

from service.core.codec import encode_event, load_reader_schema
from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import committed_offsets, free_port
from service.devtools.samples import make_samples, produce
from tests.conftest import TOKEN
from tests.integration.conftest import FAST
from tests.support.harness import (
    ServiceProcess,
    read_topic,
    request_log,
    run_cli,
    service_env,
    wait_for_lag_zero,
)

SCHEMA = load_reader_schema()
HASH = re.compile(r"^[0-9a-f]{16}$")


def _event(email: str, audience: str, action: str, n: int) -> tuple[bytes, bytes]:
    value = encode_event(
        {
            "event_id": str(uuid.uuid4()),
            "occurred_at": 1_767_225_600_000 + n,
            "email": email,
            "audience_id": "aud-" + audience,
            "audience_name": audience,
            "action": action,
            "campaign_id": None,
            "treatment_group": None,
            "attributes": {},
        },
        SCHEMA,
    )
    return email.encode(), value


def _records(bootstrap: str, topic: str) -> list[tuple[int, int]]:
    """Every record of the topic as (partition, offset), read from the broker."""
    return sorted((m.partition(), m.offset()) for m in read_topic(bootstrap, topic, 10**9, 8))


def _topics(bootstrap: str) -> set[str]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}"})
    try:
        return set(consumer.list_topics(timeout=10).topics)
    finally:
        consumer.close()


def _state(emulator: Emulator) -> dict[str, Any]:
    state = httpx.get(
        emulator.url + "/_emulator/state", timeout=10, headers=emulator.inspection_headers
    ).json()
    return {"lists": state["lists"], "contacts": state["contacts"], "imports": state["imports"]}


def _ac(emulator: Emulator, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.request(
        method, f"{emulator.url}/api/3/{path}", json=body, headers={"Api-Token": TOKEN}, timeout=10
    )
    assert answer.status_code < 300, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _dry_run(env: dict[str, str], *args: str) -> tuple[dict[str, Any], str]:
    began = time.monotonic()
    done = run_cli("run", "--dry-run", "--json", *args, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert time.monotonic() - began < 170
    return json.loads(done.stdout), done.stderr


def _assert_private(report: dict[str, Any], stdout_and_logs: str, emails: list[str]) -> None:
    for entry in report["lists"].values():
        for sample in entry["samples"].values():
            assert all(HASH.match(h) for h in sample), sample
    for email in emails:
        assert email not in stdout_and_logs
    assert TOKEN not in stdout_and_logs


def test_a_dry_run_beside_a_live_deployment_writes_nothing_and_reports_each_decision(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    live = service_env(bootstrap, topic, "g-live", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    a = [f"a{i}@example.com" for i in range(12)]
    first = [_event(e, "Audience A", "ENTERED", i) for i, e in enumerate(a)]
    first += [_event(f"b{i}@example.com", "Audience B", "ENTERED", 20 + i) for i in range(3)]
    ends = produce(bootstrap, topic, first)
    service = ServiceProcess(live, tmp_path / "live").start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-live", topic, ends, timeout=120, services=services)
    assert service.terminate() == 0

    # Outside the service: a0 unsubscribes herself; x has opted out of A in AC, unknown to the
    # ledger (another integration's contact).
    httpx.post(
        fast_emulator.url + "/_emulator/self-unsubscribe",
        json={"email": a[0], "list": "Audience A"},
        headers=fast_emulator.inspection_headers,
        timeout=10,
    ).raise_for_status()
    list_a = _state(fast_emulator)["lists"]["Audience A"]["id"]
    x = _ac(fast_emulator, "POST", "contact/sync", {"contact": {"email": "x@example.com"}})
    _ac(
        fast_emulator,
        "POST",
        "contactLists",
        {"contactList": {"list": list_a, "contact": x["contact"]["id"], "status": 2}},
    )

    second = [
        _event(a[0], "Audience A", "EXITED", 100),  # she is already out: nothing to do
        _event(a[1], "Audience A", "EXITED", 101),  # still subscribed: unsubscribe
        _event(a[2], "Audience A", "EXITED", 102),
        _event(a[3], "Audience A", "ENTERED", 103),  # the ledger holds it: nothing to do
        _event("x@example.com", "Audience A", "ENTERED", 104),  # her opt-out is kept
        _event("n9@example.com", "Audience A", "EXITED", 105),  # never ours: nothing to do
    ]
    second += [_event(f"n{i}@example.com", "Audience A", "ENTERED", 110 + i) for i in range(3)]
    second += [_event(f"c{i}@example.com", "Audience C", "ENTERED", 120 + i) for i in range(2)]
    second += [_event("not-an-email", "Audience A", "ENTERED", 130 + i) for i in range(2)]
    second += [(b"garbage@example.com", b"\x07not avro at all")]
    ends = {p: max(e, ends.get(p, 0)) for p, e in produce(bootstrap, topic, second).items()}

    live_offsets = committed_offsets(bootstrap, "g-live", topic, list(range(6)))
    before = _state(fast_emulator)
    ledger, dlq = _records(bootstrap, f"{topic}.ledger"), _records(bootstrap, f"{topic}.dlq")
    assert ledger and not dlq
    since = time.time()
    dry = {
        **live,
        "METRICS_PORT": str(free_port()),
        "AC_BULK_IMPORT": "false",  # per contact: x's opt-out is read, not hidden by an import
        "AC_TOOLS_TICK_EVERY": "2",  # the tools' ticks (half of them here, to be quick)
        "COALESCE_WINDOW_SECONDS": "5",
    }
    report, logs = _dry_run(dry)

    assert _state(fast_emulator) == before
    methods = {r["method"] for r in request_log(fast_emulator) if r["t"] >= since}
    assert methods == {"GET"}
    assert committed_offsets(bootstrap, "g-live", topic, list(range(6))) == live_offsets
    assert _records(bootstrap, f"{topic}.ledger") == ledger
    assert _records(bootstrap, f"{topic}.dlq") == dlq
    # The preview's own group is where it stopped: the end of the topic.
    preview_offsets = committed_offsets(bootstrap, "g-live.preview", topic, list(ends))
    assert preview_offsets == ends

    counts = {
        name: {c: entry[c] for c in ("subscribe", "unsubscribe", "keep_opt_out", "skip", "park")}
        for name, entry in report["lists"].items()
    }
    assert counts == {
        "Audience A": {"subscribe": 3, "unsubscribe": 2, "keep_opt_out": 1, "skip": 3, "park": 0},
        "Audience C": {"subscribe": 2, "unsubscribe": 0, "keep_opt_out": 0, "skip": 0, "park": 0},
    }
    assert report["lists"]["Audience C"]["created"] is True
    assert report["lists"]["Audience A"]["created"] is False
    assert report["records_parked"]["by_reason"] == {"invalid_email": 2, "undecodable": 1}
    assert report["writes_not_sent"] == {
        "POST /contact/sync": 6,
        "POST /contactLists": 7,
        "POST /lists": 1,
    }
    assert report["not_written"]["dead_letters"] == 3
    assert report["group"] == "g-live.preview"
    assert report["records_read"] == len(second)
    _assert_private(report, json.dumps(report) + logs, [*a, "x@example.com", "n0@example.com"])
    assert '"dry_run": true' in logs  # the start line says it


def test_a_dry_run_before_the_first_deployment_counts_the_sample_events(
    bootstrap: str, topic: str, fast_emulator: Emulator, tmp_path: Path
) -> None:
    """No ledger topic yet, imports (the bulk path), ``--exclusive``: the counts per list are
    the samples' final states (an exit of someone never subscribed is nothing to do), and no
    topic is created."""
    samples = make_samples(events=1200, emails=150, audiences=3, invalid_ratio=0.02, seed=17)
    produce(bootstrap, topic, samples.records)
    env = service_env(
        bootstrap,
        topic,
        "g-first",
        fast_emulator,
        AC_RATE_LIMIT_PER_SECOND=FAST,
        COALESCE_WINDOW_SECONDS="5",
        METRICS_PORT=str(free_port()),
    )
    before = _state(fast_emulator)
    report, logs = _dry_run(env, "--exclusive")

    assert _state(fast_emulator) == before
    assert {(r["method"], r["endpoint"]) for r in request_log(fast_emulator)} == {("GET", "/lists")}
    assert f"{topic}.ledger" not in _topics(bootstrap)
    for name, members in samples.expected.items():
        entry = report["lists"][name]
        assert entry["subscribe"] == sum(1 for s in members.values() if s == 1), name
        assert entry["skip"] == sum(1 for s in members.values() if s == 2), name
        assert entry["unsubscribe"] == entry["keep_opt_out"] == entry["park"] == 0
        assert entry["created"] is True
    assert report["records_parked"] == {
        "total": samples.invalid,
        "by_reason": {"invalid_email": samples.invalid},
        "samples": report["records_parked"]["samples"],
    }
    assert report["writes_not_sent"]["POST /lists"] == 3
    # One import contact per email, carrying every list it enters (and those whose only news
    # is their attributes: the import also updates fields).
    subscribers = {e for members in samples.expected.values() for e, s in members.items() if s == 1}
    everyone = {e for members in samples.expected.values() for e in members}
    assert len(subscribers) <= report["contacts_in_imports"] <= len(everyone)
    _assert_private(report, json.dumps(report) + logs, list(samples.expected["Audience A"])[:20])


def test_a_dry_run_of_a_missing_topic_creates_nothing_and_exits_2(
    bootstrap: str, fast_emulator: Emulator
) -> None:
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    env = service_env(
        bootstrap, missing, "g-none", fast_emulator, AC_DRY_RUN="true", METRICS_PORT="0"
    )
    done = run_cli("run", env=env, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert json.loads(done.stderr.strip().splitlines()[-1])["field"] == "KAFKA_TOPIC"
    assert not {missing, f"{missing}.dlq", f"{missing}.ledger"} & _topics(bootstrap)
    # Beside a live deployment, a preview needs the tools' ticks.
    done = run_cli("run", env={**env, "AC_TOOLS_TICK_EVERY": "0"}, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert json.loads(done.stderr.strip().splitlines()[-1])["field"] == "AC_TOOLS_TICK_EVERY"


def test_a_following_dry_run_reports_on_sigterm_and_says_so_in_its_metrics(
    bootstrap: str, topic: str, fast_emulator: Emulator, tmp_path: Path
) -> None:
    produce(bootstrap, topic, [_event("f@example.com", "Audience F", "ENTERED", 1)])
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "AC_"))
    } | service_env(bootstrap, topic, "g-follow", fast_emulator, METRICS_PORT=str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "run", "--dry-run", "--follow", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        text = ""
        applied = 'ac_sync_changes_applied_total{action="entered"} 1.0'  # would be, that is
        while applied not in text:
            assert time.monotonic() < deadline and process.poll() is None
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            time.sleep(0.3)
        assert re.search(r'^ac_sync_build_info\{.*dry_run="true".*\} 1\.0$', text, re.M)
        time.sleep(5)  # a following run does not stop at the end of the topic
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)
    assert report["lists"]["Audience F"]["subscribe"] == 1
    assert report["lists"]["Audience F"]["created"] is True
