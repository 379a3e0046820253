"""``run`` as Kubernetes runs it: SIGTERM honoured from the first instant, and a broker outage
that leaves stderr as JSON lines at a bounded rate."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import LocalBroker, create_topics, free_port
from tests.support.harness import ServiceProcess, service_env


class BlackHole:
    """A broker that accepts connections and never answers (a slow or wedged broker): librdkafka
    calls wait for their full timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    try:
        yield hole
    finally:
        hole.close()


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"  # bound then released: nothing listens there


def json_lines(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line that is not JSON: {line!r}") from None
    return records


def wait_for_line(service: ServiceProcess, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in service.log_text():
            return
        assert service.alive(), service.log_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no {needle!r} within {timeout}s:\n{service.log_text()[-3000:]}")


@pytest.mark.parametrize("broker", ["black hole", "closed port"])
def test_sigterm_during_start_up_exits_at_once_with_status_0(
    broker: str,
    black_hole: BlackHole,
    emulator: Emulator,
    services: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    """Start-up waits up to 10 s for a broker that does not answer (listing topics); a SIGTERM
    meanwhile ends the process within a second, not at SIGKILL."""
    address = black_hole.address if broker == "black hole" else closed_address()
    service = ServiceProcess(service_env(address, "t", "g-term", emulator), tmp_path / "svc")
    services.append(service.start())
    wait_for_line(service, '"msg": "ac-audience-sync starting"', timeout=30)
    time.sleep(0.3)  # inside the topic listing
    assert service.alive()
    # Meanwhile the probes answer: alive, not ready, starting; process metrics are there.
    base = f"http://127.0.0.1:{service.metrics_port}"
    live, ready = httpx.get(base + "/healthz", timeout=2), httpx.get(base + "/readyz", timeout=2)
    assert (live.status_code, live.json()) == (200, {"ok": True, "starting": True})
    assert (ready.status_code, ready.json()) == (503, {"ok": False, "starting": True})
    assert "process_resident_memory_bytes" in httpx.get(base + "/metrics", timeout=2).text
    sent = time.monotonic()
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    status = service.process.wait(10)
    took = time.monotonic() - sent
    assert status == 0
    assert took < 2.0, f"took {took:.1f}s to honour SIGTERM"
    records = json_lines(service.log_text())
    assert any(r["msg"] == "stopped during start-up; nothing was started" for r in records)
    assert not any("Traceback" in json.dumps(r) for r in records)


def test_sigterm_a_few_hundred_ms_after_exec_exits_promptly(
    black_hole: BlackHole, emulator: Emulator, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """Wherever start-up is when the signal comes: before Python has installed the handler
    the default action ends the process (status -SIGTERM, 143 in a shell); after, status 0."""
    service = ServiceProcess(
        service_env(black_hole.address, "t", "g-term", emulator), tmp_path / "svc"
    )
    services.append(service.start())
    time.sleep(0.4)
    assert service.process is not None
    sent = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    status = service.process.wait(10)
    assert time.monotonic() - sent < 2.0
    assert status in (0, -signal.SIGTERM)
    json_lines(service.log_text())


def test_a_broker_outage_writes_only_json_lines_at_a_bounded_rate(
    emulator: Emulator, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """The service runs against its own broker, which then goes away for 20 s (connections
    refused: the noisiest outage). Every stderr line stays JSON, librdkafka's included, and
    repeats are throttled: fewer than 5 lines a second on average."""
    broker = LocalBroker(log_path=tmp_path / "broker.log").start()
    try:
        topic = "outage"
        create_topics(broker.bootstrap, {topic: 3, f"{topic}.dlq": 3})
        service = ServiceProcess(
            service_env(broker.bootstrap, topic, "g-outage", emulator), tmp_path / "svc"
        )
        services.append(service.start())
        ready_url = f"http://127.0.0.1:{service.metrics_port}/readyz"
        deadline = time.monotonic() + 60
        answer = ""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(ready_url, timeout=2)
                if ready.status_code == 200:
                    break
                answer = ready.text
            assert time.monotonic() < deadline, answer + "\n" + service.log_text()[-3000:]
            assert service.alive(), service.log_text()[-3000:]
            time.sleep(0.2)
        before = len(service.log_text().splitlines())
        broker.stop()
        outage = 20.0
        time.sleep(outage)
        assert service.alive(), service.log_text()[-3000:]
        during = service.log_text().splitlines()[before:]
    finally:
        broker.stop()
    records = json_lines("\n".join(during))
    rate = len(records) / outage
    kafka = [r for r in records if r["logger"] == "librdkafka"]
    assert kafka, "librdkafka said nothing about the outage: the test did not exercise it"
    assert rate < 5.0, f"{len(records)} lines in {outage:.0f}s"
    assert any("repeated" in r for r in records), "no repeat was counted"
    json_lines(service.log_text())  # the whole log, start-up included
