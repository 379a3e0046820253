"""Run the real service (``python -m service run``) as a child process and observe it from outside:
committed offsets from the broker, final state and request log from the emulator, the DLQ from Kafka."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer

from service.devtools.demo import peak_per_second
from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import committed_offsets, free_port
from tests.conftest import TOKEN


@dataclass
class ServiceProcess:
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = field(default_factory=free_port)
    logs: list[Path] = field(default_factory=list)

    def start(self) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "AC_"))}
        env.update(self.env)
        env["METRICS_PORT"] = str(self.metrics_port)
        path = self.log_path.with_name(f"{self.log_path.stem}-{len(self.logs)}.log")
        self.logs.append(path)
        with open(path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "run"], env=env, stdout=log, stderr=log
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m service ARGS`` as a user runs it, with only the given KAFKA_/AC_ settings."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "AC_"))}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=full,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


def service_env(
    bootstrap: str, topic: str, group: str, emulator: Emulator, **extra: str
) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_GROUP_ID": group,
        "KAFKA_PROPERTY_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_PROPERTY_HEARTBEAT_INTERVAL_MS": "1000",
        "AC_API_URL": emulator.url,
        "AC_API_TOKEN": TOKEN,
        # Lists are created (the default): AC requires a sender URL, and the service refuses
        # none or an example domain. ".test" is reserved for tests (RFC 2606).
        "AC_LIST_SENDER_URL": "https://www.ac-audience-sync.test",
        "COALESCE_WINDOW_SECONDS": "1",
        "COMMIT_INTERVAL_SECONDS": "0.5",
        "AC_REQUEST_TIMEOUT_SECONDS": "2",
        "RETRY_MAX_BACKOFF_SECONDS": "4",
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


def lag(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> int:
    committed = committed_offsets(bootstrap, group, topic, list(ends))
    return sum(max(0, end - max(0, committed.get(p, 0))) for p, end in ends.items())


def wait_for_lag_zero(
    bootstrap: str,
    group: str,
    topic: str,
    ends: dict[int, int],
    timeout: float,
    services: list[ServiceProcess] | None = None,
) -> float:
    began = time.monotonic()
    last = -1
    while time.monotonic() - began < timeout:
        last = lag(bootstrap, group, topic, ends)
        if last == 0:
            return time.monotonic() - began
        for service in services or []:
            if service.process is not None and not service.alive():
                raise AssertionError(f"service exited early:\n{service.log_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"lag still {last} after {timeout}s")


def emulator_lists(emulator: Emulator) -> dict[str, dict[str, int]]:
    state = httpx.get(
        emulator.url + "/_emulator/state", timeout=10, headers=emulator.inspection_headers
    ).json()
    return {name: data["members"] for name, data in state["lists"].items()}


def request_log(emulator: Emulator) -> list[dict[str, Any]]:
    return httpx.get(
        emulator.url + "/_emulator/requests", timeout=10, headers=emulator.inspection_headers
    ).json()["requests"]  # type: ignore[no-any-return]


def max_in_any_second(times: list[float]) -> int:
    return peak_per_second(times, 1.0)


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(records) < expected:
            records += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        # read a little longer to catch extras
        end = time.monotonic() + 2
        while time.monotonic() < end:
            records += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return records
