"""``forget`` end to end: the real broker, the emulator, the service and the CLI as processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from service.devtools.emulator.server import Emulator
from service.devtools.samples import make_samples, produce
from tests.conftest import TOKEN
from tests.integration.conftest import FAST
from tests.integration.test_ledger import event
from tests.integration.test_redrive import records
from tests.support.harness import ServiceProcess, run_cli, service_env, wait_for_lag_zero

TARGET = "person00003@example.com"


def compacted(bootstrap: str, topic: str) -> dict[tuple[int, bytes], bytes | None]:
    """The ledger as compaction leaves it: the last value per (partition, key)."""
    latest: dict[tuple[int, bytes], bytes | None] = {}
    for record in records(bootstrap, topic):
        assert record.key is not None
        latest[(record.partition, record.key)] = record.value
    return latest


def explain(env: dict[str, str], email: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("explain", email, "--json", env=env)
    return result.returncode, json.loads(result.stdout)


def ac_contacts(emulator: Emulator, email: str) -> list[Any]:
    response = httpx.get(
        f"{emulator.url}/api/3/contacts",
        params={"email": email},
        headers={"Api-Token": TOKEN},
        timeout=10,
    )
    return response.json()["contacts"]  # type: ignore[no-any-return]


def test_forget_erases_an_email_from_the_ledger_and_ac_and_the_service_runs_on(
    bootstrap: str,
    topic: str,
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    samples = make_samples(events=200, emails=12, audiences=2, seed=31)
    ends = produce(bootstrap, topic, samples.records)
    env = service_env(bootstrap, topic, "g-forget", fast_emulator, AC_RATE_LIMIT_PER_SECOND=FAST)
    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    wait_for_lag_zero(bootstrap, "g-forget", topic, ends, timeout=90, services=services)
    ledger = f"{topic}.ledger"
    code, before = explain(env, TARGET)
    assert code == 0 and len(before["lists"]) == 2  # in both audiences' lists
    assert ac_contacts(fast_emulator, TARGET)

    # While a replica runs, nothing is written (it could write the entry back from memory).
    refused = run_cli("forget", TARGET, "--delete-contact", env=env)
    assert refused.returncode == 1
    assert "the service is running" in refused.stderr and "nothing was written" in refused.stderr
    dry = run_cli("forget", TARGET, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["written"] is False and planned["replicas_running"]
    assert planned["emails"][0]["in_ledger"] is True
    [partition] = planned["emails"][0]["ledger_partitions"]
    assert compacted(bootstrap, ledger)[(partition, TARGET.encode())]  # still there

    assert service.terminate() == 0
    emails_before = {k for (_, k), v in compacted(bootstrap, ledger).items() if v and b"@" in k}
    assert TARGET.encode() in emails_before
    done = run_cli("forget", f"  {TARGET.upper()} ", "--delete-contact", "--json", env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    [item] = summary["emails"]
    assert summary["written"] is True and summary["replicas_running"] is None
    assert item["in_ledger"] is True and summary["tombstones"] == len(item["ledger_partitions"])
    assert item["contact"]["deleted"] is True and summary["contacts_deleted"] == 1
    assert TARGET not in done.stdout.lower() + done.stderr.lower()

    # After compaction no record of the ledger carries the email; the other emails remain.
    latest = compacted(bootstrap, ledger)
    assert not [k for k, v in latest.items() if k[1] == TARGET.encode() and v is not None]
    assert not [k for k, v in latest.items() if v is not None and TARGET.encode() in v]
    assert [(p, k) for (p, k), v in latest.items() if k == TARGET.encode()] == [
        (p, TARGET.encode()) for p in item["ledger_partitions"]
    ]
    others = {k for (_, k), v in latest.items() if v is not None and b"@" in k}
    assert others == emails_before - {TARGET.encode()}
    code, after = explain(env, TARGET)
    assert code == 1 and after["found"] is False
    other = sorted(others)[0].decode()
    assert explain(env, other)[0] == 0
    assert ac_contacts(fast_emulator, TARGET) == []

    # A second forget finds nothing left to write.
    again = run_cli("forget", TARGET, "--delete-contact", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["tombstones"] == 0
    assert json.loads(again.stdout)["emails"][0]["contact"] == {"id": None, "deleted": False}

    # The service starts again and runs on: it restored the ledger with the tombstone, so a
    # new event of the person (a new sign-up) records only that, nothing of what was erased.
    service = ServiceProcess(env, tmp_path / "svc2").start()
    services.append(service)
    more = produce(
        bootstrap,
        topic,
        [
            event(other, "ENTERED", "Audience A", at=10_000),
            event(TARGET, "ENTERED", "Newsletter", at=10_001),
        ],
    )
    wait_for_lag_zero(
        bootstrap,
        "g-forget",
        topic,
        {p: max(ends.get(p, 0), more.get(p, 0)) for p in set(ends) | set(more)},
        timeout=90,
        services=[service],
    )
    code, fresh = explain(env, TARGET)
    assert code == 0
    assert [item["list"] for item in fresh["lists"]] == ["Newsletter"]
    assert service.alive()
    assert service.terminate() == 0


def test_forget_refuses_a_malformed_email_and_writes_nothing(tmp_path: Path) -> None:
    batch = tmp_path / "erasure.txt"
    batch.write_text("# ticket 7\nok@example.com\nnot an email\n", encoding="utf-8")
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_TOPIC": "t"}
    result = run_cli("forget", "--from-file", str(batch), env=env)
    assert result.returncode == 2
    assert "line 3: not a valid email address" in result.stderr
    assert "not an email" not in result.stderr
    both = run_cli("forget", "a@example.com", "--from-file", str(batch), env=env)
    assert both.returncode == 2
