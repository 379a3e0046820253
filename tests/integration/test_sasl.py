"""The service authenticates to Kafka with SASL/SCRAM-SHA-512 credentials read from files.

Tansu speaks SCRAM but cannot be given a user while it requires authentication (its storage is
in memory and its user tool does not authenticate), so the broker sits behind
``tests/support/scram_proxy.py``: a gate that runs the SCRAM exchange itself, verifying the
client's proof against the password, and closes any connection that sends anything else before
authenticating. Every client of the service (consumer, producers, the ledger's readers, the
admin client) goes through it: the broker advertises the gate's address.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import broker_binary, free_port
from service.devtools.samples import make_samples, subscribed
from tests.integration.conftest import FAST
from tests.support.harness import ServiceProcess, emulator_lists, run_cli, service_env
from tests.support.scram_proxy import ScramProxy

USER, PASSWORD = "ac-sync", "pw-from-a-secret-7c1e"


@pytest.fixture
def sasl_broker(tmp_path: Path) -> Iterator[tuple[str, ScramProxy]]:
    broker_port, gate_port = free_port(), free_port()
    with open(tmp_path / "tansu.log", "wb") as log:
        broker = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{broker_port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{gate_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gate = ScramProxy(("127.0.0.1", broker_port), {USER: PASSWORD}, port=gate_port).start()
    try:
        yield f"127.0.0.1:{gate_port}", gate
    finally:
        gate.stop()
        broker.terminate()
        broker.wait(10)


def client_config(bootstrap: str, password: str = PASSWORD) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": USER,
        "sasl.password": password,
    }


def sasl_env(
    bootstrap: str, topic: str, emulator: Emulator, tmp_path: Path, password: str
) -> dict[str, str]:
    (tmp_path / "username").write_text(f"{USER}\n")
    (tmp_path / "password").write_text(f"{password}\n")  # trailing newline, as `kubectl` writes
    return service_env(
        bootstrap,
        topic,
        "g-sasl",
        emulator,
        AC_RATE_LIMIT_PER_SECOND=FAST,
        KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_PROPERTY_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_PROPERTY_SASL_USERNAME_FILE=str(tmp_path / "username"),
        KAFKA_PROPERTY_SASL_PASSWORD_FILE=str(tmp_path / "password"),
    )


def prepare(bootstrap: str, topic: str, events: int) -> dict[str, dict[str, int]]:
    admin = AdminClient(client_config(bootstrap))
    for future in admin.create_topics([NewTopic(topic, 3), NewTopic(f"{topic}.dlq", 3)]).values():
        future.result(15)
    samples = make_samples(events=events, emails=20, audiences=2, seed=3)
    producer = Producer({**client_config(bootstrap), "acks": "all"})
    for key, value in samples.records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    return samples.expected


def test_the_service_authenticates_with_scram_credentials_from_files(
    sasl_broker: tuple[str, ScramProxy],
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    bootstrap, gate = sasl_broker
    expected = prepare(bootstrap, "sasl", events=200)
    authenticated_before = len(gate.authenticated)
    env = sasl_env(bootstrap, "sasl", fast_emulator, tmp_path, PASSWORD)

    checked = run_cli("check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK    topic: sasl has 3 partition(s)" in checked.stdout

    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    deadline = time.monotonic() + 90
    while subscribed(emulator_lists(fast_emulator)) != subscribed(expected):
        assert time.monotonic() < deadline, service.log_text()[-3000:]
        assert service.alive(), service.log_text()[-3000:]
        time.sleep(0.5)
    assert service.terminate() == 0
    # Consumer, DLQ/ledger producer, ledger reader, admin: each authenticated with the files'
    # credentials; none was refused, none tried to talk before authenticating.
    assert len(gate.authenticated) - authenticated_before >= 3
    assert set(gate.authenticated) == {USER}
    assert gate.refused == [] and gate.rejected_before_auth == 0
    log = service.log_text()
    assert PASSWORD not in log
    [json.loads(line) for line in log.splitlines()]


def test_a_wrong_password_is_refused_applies_nothing_and_is_logged_as_json(
    sasl_broker: tuple[str, ScramProxy],
    fast_emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    bootstrap, gate = sasl_broker
    prepare(bootstrap, "sasl", events=20)
    wrong = "not-the-password-4d2a"
    env = sasl_env(bootstrap, "sasl", fast_emulator, tmp_path, wrong)

    checked = run_cli("check", "--timeout", "3", env=env)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "FAIL  broker: refused the credentials" in checked.stdout
    assert "KAFKA_PROPERTY_SASL_PASSWORD" in checked.stdout

    service = ServiceProcess(env, tmp_path / "svc").start()
    services.append(service)
    time.sleep(15)
    assert service.alive(), service.log_text()[-3000:]
    assert emulator_lists(fast_emulator) == {}
    assert USER in gate.refused
    log = service.log_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert any(
        r["logger"] == "librdkafka" and "Authentication failed" in str(r["msg"]) for r in records
    ), log[-3000:]
    assert wrong not in log and PASSWORD not in log
    assert service.terminate() == 0
