"""``redrive`` end to end: the real broker, the emulator, the service and the CLI as processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING

from service.adapters.kafka_readers import Record, RecordScanner
from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import create_topics
from service.devtools.samples import make_samples, produce, subscribed
from tests.conftest import TOKEN
from tests.integration.conftest import FAST
from tests.support.harness import (
    ServiceProcess,
    emulator_lists,
    run_cli,
    service_env,
    wait_for_lag_zero,
)

PARTITIONS = 6


def records(bootstrap: str, topic: str) -> list[Record]:
    """Every record of the topic, tombstones and headers included."""
    scanner = RecordScanner(
        {"bootstrap.servers": bootstrap, "group.id": "test-scan"},
        topic,
        dict.fromkeys(range(PARTITIONS), OFFSET_BEGINNING),
    )
    found: list[Record] = []
    try:
        while not scanner.done():
            found += scanner.read(1000, 0.2)
    finally:
        scanner.close()
    return found


def ends_of(bootstrap: str, topic: str) -> dict[int, int]:
    ends: dict[int, int] = {}
    for record in records(bootstrap, topic):
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    return ends


def redrive(env: dict[str, str], *args: str) -> tuple[dict[str, Any], str]:
    result = run_cli("redrive", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def headers(record: Record) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in record.headers:
        found.setdefault(key, []).append(value.decode())
    return found


def test_redrive_reports_then_redrives_once_parks_again_with_history_and_forced_applies(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=150, emails=15, audiences=2, invalid_ratio=0.05, seed=23)
    assert samples.invalid > 0
    ends = produce(bootstrap, topic, samples.records)
    # No list exists and none may be created: every valid change is parked (list_missing).
    env = service_env(
        bootstrap,
        topic,
        "g-redrive",
        fast_emulator,
        AC_RATE_LIMIT_PER_SECOND=FAST,
        AC_CREATE_LISTS="false",
    )
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-redrive", topic, ends, timeout=90, services=services)
    dlq = f"{topic}.dlq"
    letters = {(r.partition, r.offset): r for r in records(bootstrap, dlq)}

    # 1. The dry run (the default): counts per reason, nothing written.
    report, progress = redrive(env)
    assert "dead-letter topic: " in progress and "record(s) read" in progress
    assert report["dry_run"] is True and report["redriven"] == 0
    assert report["read"] == report["selected"] == len(letters)
    reasons = report["reasons"]
    assert reasons["invalid_email"] == {
        "selected": samples.invalid,
        "not_redrivable": samples.invalid,
    }
    parked = reasons["list_missing"]["selected"]
    first = reasons["list_missing"]["redrive"]
    assert first > 0
    assert first + reasons["list_missing"].get("superseded", 0) == parked
    assert ends_of(bootstrap, topic) == ends

    # 2. Redriven while the lists are still missing: parked again, with both histories.
    report, _ = redrive(env, "--execute")
    assert report["dry_run"] is False and report["run_id"]
    assert report["redriven"] == report["to_redrive"] == first and report["failed"] == 0
    chosen = {
        (item["dlq_partition"], item["dlq_offset"]): item
        for item in report["records"]
        if item["outcome"] == "redrive"
    }
    for item in chosen.values():
        assert item["redriven_to"]["partition"] == item["source_partition"]
    new_ends = dict(ends)
    for item in chosen.values():
        to = item["redriven_to"]
        new_ends[to["partition"]] = max(new_ends.get(to["partition"], 0), to["offset"] + 1)
    wait_for_lag_zero(bootstrap, "g-redrive", topic, new_ends, timeout=60, services=services)
    copies = [r for r in records(bootstrap, topic) if "redrive.id" in headers(r)]
    assert len(copies) == first
    again = [r for r in records(bootstrap, dlq) if "redrive.id" in headers(r)]
    assert len(again) == first
    for record in again:
        found = headers(record)
        assert found["dlq.reason"] == ["list_missing"]
        assert found["redrive.dlq.reason"] == ["list_missing"]
        assert found["redrive.id"] == [report["run_id"]]
        _, partition, offset = found["redrive.from"][0].rsplit("/", 2)
        original = letters[(int(partition), int(offset))]
        assert found["redrive.dlq.source.offset"] == headers(original)["dlq.source.offset"]
        assert found["redrive.dlq.failed_at"] == headers(original)["dlq.failed_at"]
        assert record.key == original.key and record.value == original.value
        # the new failure is of the redriven copy, at its own source offset
        assert int(found["dlq.source.offset"][0]) >= ends[int(found["dlq.source.partition"][0])]

    # 3. A second run redrives nothing: the originals have their copies (the receipts) on the
    # source topic; the records that failed again wait for their reason to be named.
    report, _ = redrive(env, "--execute")
    assert report["to_redrive"] == report["redriven"] == 0 and report["run_id"] is None
    assert report["reasons"]["list_missing"]["already_redriven"] == first
    assert report["reasons"]["list_missing"]["failed_after_redrive"] == first
    assert ends_of(bootstrap, topic) == new_ends

    # 4. The cause fixed (the lists created in AC), the reason named: applied.
    for name in samples.expected:
        response = httpx.post(
            f"{fast_emulator.url}/api/3/lists",
            json={
                "list": {
                    "name": name,
                    "stringid": name.lower().replace(" ", "-"),
                    "sender_url": "https://www.ac-audience-sync.test",
                    "sender_reminder": "You signed up.",
                }
            },
            headers={"Api-Token": TOKEN},
            timeout=10,
        )
        assert response.status_code == 201, response.text
    report, _ = redrive(env, "--reason", "list_missing", "--execute")
    assert report["redriven"] == first
    assert report["reasons"]["list_missing"]["already_redriven"] == first
    assert "invalid_email" not in report["reasons"]
    final_ends = dict(new_ends)
    for item in report["records"]:
        if "redriven_to" in item:
            to = item["redriven_to"]
            final_ends[to["partition"]] = max(final_ends[to["partition"]], to["offset"] + 1)
            assert item["redrives_before"] == 1
    wait_for_lag_zero(bootstrap, "g-redrive", topic, final_ends, timeout=60, services=services)
    assert subscribed(emulator_lists(fast_emulator)) == subscribed(samples.expected)
    assert len(records(bootstrap, dlq)) == len(letters) + first  # nothing parked this time

    # 5. And nothing is ever redriven twice.
    report, _ = redrive(env, "--reason", "list_missing", "--execute")
    assert report["redriven"] == 0
    assert report["reasons"]["list_missing"]["already_redriven"] == 2 * first
    assert ends_of(bootstrap, topic) == final_ends
    assert service.terminate() == 0


def test_a_later_event_of_the_same_email_and_list_supersedes_a_letter(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    from tests.integration.test_ledger import event

    env = service_env(bootstrap, topic, "g-super", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    env["AC_CREATE_LISTS"] = "false"
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    # Two windows apart: two letters of one email and list, the second newer.
    ends = produce(bootstrap, topic, [event("pat@example.com", "EXITED", "VIP", at=1)])
    wait_for_lag_zero(bootstrap, "g-super", topic, ends, timeout=60, services=services)
    ends = produce(bootstrap, topic, [event("pat@example.com", "ENTERED", "VIP", at=2)])
    wait_for_lag_zero(bootstrap, "g-super", topic, ends, timeout=60, services=services)
    report, _ = redrive(env)
    outcomes = sorted((r["source_offset"], r["outcome"]) for r in report["records"])
    assert outcomes == [(0, "superseded"), (1, "redrive")]
    assert service.terminate() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "ISO 8601"),
        (["--reason", "list_missin"], "unknown reason(s) list_missin"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TOPIC": "t"}
    result = run_cli("redrive", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_no_dead_letter_topic_exits_2_and_an_unreachable_broker_3(bootstrap: str) -> None:
    create_topics(bootstrap, {"t-nodlq": 1})
    result = run_cli(
        "redrive", env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": "t-nodlq"}
    )
    assert result.returncode == 2
    assert "KAFKA_DLQ_TOPIC: t-nodlq.dlq does not exist" in result.stderr
    from tests.integration.test_cli import closed_port

    result = run_cli(
        "redrive",
        "--timeout",
        "2",
        env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port()}", "KAFKA_TOPIC": "t"},
    )
    assert result.returncode == 3
    assert "unreachable" in result.stderr
