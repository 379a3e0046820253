"""The metrics/health server over real sockets: half-sent requests cost no thread and are closed
at their deadline, the number of threads is fixed, and probes are answered meanwhile."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from service.app.health import WORKERS, HealthServer

TIMEOUT = 2.0


def alive() -> tuple[bool, dict[str, Any]]:
    return True, {"heartbeat_age_seconds": 0.1}


def not_ready() -> tuple[bool, dict[str, Any]]:
    return False, {"reason": "no partitions assigned"}


@pytest.fixture
def server() -> Iterator[HealthServer]:
    registry = CollectorRegistry()
    Counter("ac_sync_test_total", "a test counter", registry=registry).inc(3)
    health = HealthServer(
        ("127.0.0.1", 0), registry, alive, not_ready, request_timeout=TIMEOUT
    ).start()
    try:
        yield health
    finally:
        health.stop()


def get(server: HealthServer, path: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{server.port}{path}", timeout=TIMEOUT)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_answers_probes_and_metrics(server: HealthServer) -> None:
    live = get(server, "/healthz")
    assert live.status_code == 200 and live.json() == {"ok": True, "heartbeat_age_seconds": 0.1}
    ready = get(server, "/readyz?verbose=1")
    assert ready.status_code == 503 and ready.json()["reason"] == "no partitions assigned"
    metrics = get(server, "/metrics")
    assert metrics.status_code == 200 and "ac_sync_test_total 3.0" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert get(server, "/nope").status_code == 404
    assert get(server, "/healthz", "POST").status_code == 405
    head = get(server, "/healthz", "HEAD")
    assert head.status_code == 200 and head.content == b""


def test_half_sent_requests_are_closed_at_their_deadline_and_hold_no_thread(
    server: HealthServer,
) -> None:
    threads_before = threading.active_count()
    hanging = []
    began = time.monotonic()
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: half a request
        hanging.append(sock)
    try:
        # Meanwhile the server answers, quickly, and uses no thread per connection.
        for _ in range(3):
            asked = time.monotonic()
            assert get(server, "/healthz").status_code == 200
            assert time.monotonic() - asked < 1.0
        assert threading.active_count() - threads_before <= WORKERS
        assert server.open_connections <= 64
        # Every hanging connection is closed by the server by its deadline.
        for sock in hanging:
            left = began + TIMEOUT + 1.5 - time.monotonic()
            assert closed_by_peer(sock, max(0.05, left)), "a half-sent request was kept open"
        assert time.monotonic() - began < TIMEOUT + 1.5
    finally:
        for sock in hanging:
            sock.close()
    assert get(server, "/healthz").status_code == 200
    # (the server closes a connection just after writing its answer: allow it that instant)
    deadline = time.monotonic() + 1.0
    while server.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.open_connections == 0


def test_a_trickled_request_is_closed_at_the_deadline_too(server: HealthServer) -> None:
    """One byte every 0.3 s: a per-read timeout would never fire; the deadline does."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    began = time.monotonic()
    try:
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: a-long-host-name.example\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_by_peer(sock, 0.3):
                closed = True
                break
        assert closed
        assert time.monotonic() - began < TIMEOUT + 1.0
    finally:
        sock.close()


def test_oversized_headers_are_refused(server: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000)
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 431")


def test_a_failing_probe_is_a_500_not_a_dead_server() -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("probe bug")

    health = HealthServer(("127.0.0.1", 0), CollectorRegistry(), broken, broken).start()
    try:
        for _ in range(WORKERS + 2):
            answer = httpx.get(f"http://127.0.0.1:{health.port}/healthz", timeout=5)
            assert answer.status_code == 500
    finally:
        health.stop()


def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            HealthServer(("127.0.0.1", port), CollectorRegistry(), alive, alive)
