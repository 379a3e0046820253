"""The pipeline end to end: real broker, the emulator over sockets, the real CLI process."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx

from service.devtools.emulator.server import Emulator
from service.devtools.samples import make_samples, produce, subscribed
from tests.integration.conftest import FAST
from tests.support.harness import (
    ServiceProcess,
    emulator_lists,
    max_in_any_second,
    read_topic,
    request_log,
    service_env,
    wait_for_lag_zero,
)


def test_thousands_of_events_final_state_and_dlq(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=4000, emails=300, audiences=4, invalid_ratio=0.02, seed=11)
    ends = produce(bootstrap, topic, samples.records)
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-final", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "svc",
    ).start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-final", topic, ends, timeout=240, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    dlq = read_topic(bootstrap, f"{topic}.dlq", samples.invalid)
    assert len(dlq) == samples.invalid
    for record in dlq:
        headers = {k: v.decode() for k, v in record.headers()}
        assert headers["dlq.reason"] == "invalid_email"
        assert headers["dlq.error_class"] == "PoisonMessage"
        assert headers["dlq.source.topic"] == topic
        assert int(headers["dlq.source.offset"]) >= 0
    metrics = service.metrics()
    assert (
        f'ac_sync_dlq_records_total{{reason="invalid_email"}} {float(samples.invalid)}' in metrics
    )
    assert "ac_sync_events_coalesced_total" in metrics
    assert service.terminate() == 0


def test_a_caught_up_backlog_published_long_ago_does_not_wait_a_window_after_it_was_read(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """Records published ten minutes ago (their timestamps) and a 30 s window: once the
    partitions are caught up their windows are long over, so they are applied well before 30 s
    after they were read (a consumer that had kept up would have sent them long ago), and
    still coalesced: every event of the backlog was read first."""
    samples = make_samples(events=3000, emails=400, audiences=3, seed=21)
    ends = produce(bootstrap, topic, samples.records, timestamp_ms=int((time.time() - 600) * 1000))
    env = service_env(
        bootstrap,
        topic,
        "g-published",
        fast_emulator,
        AC_RATE_LIMIT_PER_SECOND=FAST,
        COALESCE_WINDOW_SECONDS="30",
    )
    began = time.monotonic()
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-published", topic, ends, timeout=120, services=services)
    assert time.monotonic() - began < 30.0  # the records were read after the service started
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    # Coalesced: no email was written twice (one import or one per-contact write each).
    log = request_log(fast_emulator)
    writes = [r for r in log if r["endpoint"] in ("/contact/sync", "/import/bulk_import")]
    assert len(writes) < 400 / 2


def test_sigkill_at_random_moments_loses_nothing(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    fast_emulator.account.set_faults({"latency_ms": [5, 30]}, 0.0)
    samples = make_samples(events=3000, emails=400, audiences=3, seed=12)
    ends = produce(bootstrap, topic, samples.records)
    env = service_env(
        bootstrap,
        topic,
        "g-kill",
        fast_emulator,
        AC_RATE_LIMIT_PER_SECOND="60",
        COALESCE_WINDOW_SECONDS="0.5",
    )
    service = ServiceProcess(env, tmp_path / "svc")
    services.append(service)
    rng = random.Random(3)
    for _ in range(4):
        service.start()
        time.sleep(rng.uniform(4.0, 9.0))  # joins the group (~3 s), then works for a while
        service.kill()
    service.start()
    wait_for_lag_zero(bootstrap, "g-kill", topic, ends, timeout=300, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    assert len(service.logs) == 5


def test_ac_faults_keep_state_exact_and_never_exceed_5_per_second(
    bootstrap: str, topic: str, emulator: Emulator, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """At AC's real limit: 10% 5xx, some timeouts, a 429 storm, added latency. The faults start
    with the service's first request (a storm set before start-up could end during the group
    join, and the test would prove nothing about 429s)."""
    samples = make_samples(events=400, emails=50, audiences=2, seed=13)
    ends = produce(bootstrap, topic, samples.records)
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-faults", emulator, AC_RATE_LIMIT_PER_SECOND="5"),
        tmp_path / "svc",
    ).start()
    services.append(service)
    deadline = time.monotonic() + 60
    while not request_log(emulator):
        assert time.monotonic() < deadline, service.log_text()[-3000:]
        time.sleep(0.01)
    emulator.account.set_faults(
        {
            "latency_ms": [50, 300],
            "error_5xx_ratio": 0.1,
            "timeout_ratio": 0.03,
            "timeout_seconds": 2.5,
            "storm_429_ratio": 0.5,
            "storm_429_retry_after": 3,
            "storm_429_seconds": 12,
        },
        time.time(),  # the emulator runs on wall time
    )
    wait_for_lag_zero(bootstrap, "g-faults", topic, ends, timeout=400, services=services)
    assert subscribed(emulator_lists(emulator)) == subscribed(samples.expected)
    log = request_log(emulator)
    statuses = {r["status"] for r in log}
    assert 429 in statuses and statuses & {500, 502, 503}, statuses
    assert max_in_any_second([r["t"] for r in log]) <= 5
    assert "ac_sync_ac_rate_limited_total" in service.metrics()


def test_consumers_in_one_group_with_partitions_moving(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    fast_emulator.account.set_faults({"latency_ms": [5, 20]}, 0.0)
    samples = make_samples(events=4000, emails=500, audiences=3, seed=14)
    ends = produce(bootstrap, topic, samples.records)
    env = service_env(bootstrap, topic, "g-group", fast_emulator, AC_RATE_LIMIT_PER_SECOND="40")
    a = ServiceProcess(env, tmp_path / "a").start()
    b = ServiceProcess(env, tmp_path / "b")
    c = ServiceProcess(env, tmp_path / "c")
    services.extend([a, b, c])
    time.sleep(5)
    b.start()  # partitions move a -> b
    time.sleep(6)
    c.start()  # and again
    time.sleep(6)
    assert b.terminate() == 0  # b's partitions move back
    wait_for_lag_zero(bootstrap, "g-group", topic, ends, timeout=300, services=[a, c])
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    # The partitions really moved: a gave some up when b and c joined, c got some, and after
    # b's exit a got some back (it logs every assignment: at least twice).
    assert "partitions revoked" in a.log_text()
    assert "partitions assigned" in c.log_text()
    assert a.log_text().count("partitions assigned") >= 2


def test_sigterm_with_pending_work_exits_0_and_loses_nothing(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=600, emails=100, audiences=2, seed=15)
    ends = produce(bootstrap, topic, samples.records)
    # A long window keeps changes pending when SIGTERM arrives; the grace period flushes them.
    env = service_env(
        bootstrap,
        topic,
        "g-term",
        fast_emulator,
        AC_RATE_LIMIT_PER_SECOND=FAST,
        COALESCE_WINDOW_SECONDS="120",
        SHUTDOWN_GRACE_SECONDS="15",
    )
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if "ac_sync_changes_pending " in service.metrics() and _pending(service) > 0:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    assert _pending(service) > 0
    began = time.monotonic()
    assert service.terminate(timeout=30) == 0
    assert time.monotonic() - began < 15
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(
        samples.expected
    )  # flushed during the grace period
    service.start()
    wait_for_lag_zero(bootstrap, "g-term", topic, ends, timeout=60, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)


def _first_final_offsets(bootstrap: str, topic: str, ends: dict[int, int]) -> dict[int, int]:
    """Per partition, the offset of the first record no later record of its (email, audience)
    follows: what a commit may not pass before AC confirmed it."""
    from service.adapters.kafka_readers import RecordScanner
    from service.core.codec import EventDecoder, load_reader_schema

    scanner = RecordScanner({"bootstrap.servers": bootstrap}, topic, {p: -2 for p in ends})
    decoder = EventDecoder(load_reader_schema())
    last: dict[tuple[int, str, str], int] = {}
    deadline = time.monotonic() + 30
    while not scanner.done() and time.monotonic() < deadline:
        for record in scanner.read(500, 0.2):
            event = decoder.decode(record.value)
            last[(record.partition, event.email, event.audience_name)] = record.offset
    scanner.close()
    assert scanner.done()
    first: dict[int, int] = {p: end for p, end in ends.items()}
    for (partition, _, _), offset in last.items():
        first[partition] = min(first[partition], offset)
    return first


def _pending(service: ServiceProcess) -> float:
    for line in service.metrics().splitlines():
        if line.startswith("ac_sync_changes_pending "):
            return float(line.split()[1])
    return 0.0


def test_refused_token_stops_sending_keeps_offsets_and_recovers(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    from service.devtools.localbroker import committed_offsets

    fast_emulator.account.set_faults({"auth_failure": True}, 0.0)
    samples = make_samples(events=300, emails=40, audiences=2, seed=16)
    ends = produce(bootstrap, topic, samples.records)
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-auth", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "svc",
    ).start()
    services.append(service)
    deadline = time.monotonic() + 40
    metrics = ""
    while time.monotonic() < deadline:
        try:
            metrics = service.metrics()
        except httpx.HTTPError:
            time.sleep(0.3)
            continue
        if "ac_sync_auth_rejected 1.0" in metrics:
            break
        time.sleep(0.3)
    assert "ac_sync_auth_rejected 1.0" in metrics
    ready = httpx.get(f"http://127.0.0.1:{service.metrics_port}/readyz")
    assert ready.status_code == 503
    assert ready.json()["token_accepted"] is False
    assert httpx.get(f"http://127.0.0.1:{service.metrics_port}/healthz").status_code == 200
    time.sleep(3)
    refused = len(request_log(fast_emulator))
    assert refused < 10  # it stopped sending: one probe at a time, not one request per record
    committed = committed_offsets(bootstrap, "g-auth", topic, list(ends))
    # Nothing was confirmed, so no partition may be committed past a record that is the last of
    # its (email, list): the backlog was read ahead, and only the records a later one of the
    # same key supersedes may complete (README "Throughput").
    last_of_key = _first_final_offsets(bootstrap, topic, ends)
    assert all(o <= last_of_key[p] for p, o in committed.items()), (committed, last_of_key)
    assert 'ac_sync_dlq_records_total{reason="ac_rejected"} 0.0' in service.metrics()
    fast_emulator.account.set_faults({}, 0.0)  # the token is accepted again
    wait_for_lag_zero(bootstrap, "g-auth", topic, ends, timeout=90, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    assert httpx.get(f"http://127.0.0.1:{service.metrics_port}/readyz").status_code == 200


def test_permanent_ac_refusal_goes_to_dlq_with_acs_code(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=200, emails=20, audiences=1, seed=17)
    excluded = "person00003@example.com"
    httpx.post(
        fast_emulator.url + "/_emulator/exclusions",
        json={"emails": [excluded]},
        headers=fast_emulator.inspection_headers,
    )
    ends = produce(bootstrap, topic, samples.records)
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-perm", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST),
        tmp_path / "svc",
    ).start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-perm", topic, ends, timeout=60, services=services)
    expected = {
        name: {e: s for e, s in members.items() if e != excluded}
        for name, members in samples.expected.items()
    }
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(expected)
    [letter] = read_topic(bootstrap, f"{topic}.dlq", 1)
    headers = {k: v.decode() for k, v in letter.headers()}
    assert headers["dlq.reason"] == "ac_rejected"
    assert headers["dlq.ac_code"] == "email_excluded"
    assert headers["dlq.ac_status"] == "422"
    assert excluded not in service.log_text()
