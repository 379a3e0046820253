"""``/metrics``, ``/healthz`` and ``/readyz`` on ``METRICS_HOST:METRICS_PORT``.

Liveness is only "the main loop still iterates": AC or Kafka being down never fails it (a restart
fixes neither and adds a rebalance). Readiness is "assigned, connected, token accepted".

The server is built so that no client can hold it:

- one thread reads every connection without blocking (``selectors``) until the request's
  headers are complete; a connection that has not sent a whole request, or not read its whole
  answer, within ``request_timeout`` seconds of being accepted is closed. A half-sent request
  costs a buffer, never a thread;
- complete requests are answered by a fixed pool of ``workers`` threads (the probes and
  ``generate_latest``); the answer is written back by the reading thread, without blocking;
- at most ``max_connections`` are open: beyond that, the oldest connection still sending its
  request is closed to make room (a probe sends its request at once, so it is served);
- only ``GET`` and ``HEAD``, headers up to 8 KiB, one request per connection
  (``Connection: close``).
"""

from __future__ import annotations

import contextlib
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, dict[str, Any]]]

REQUEST_TIMEOUT_SECONDS = 5.0
MAX_CONNECTIONS = 64
WORKERS = 4
MAX_HEADER_BYTES = 8192

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def response(status: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head else body)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    answer: bytes = b""
    sent: int = 0
    reading: bool = True
    closed: bool = False


class HealthServer:
    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        liveness: Probe,
        readiness: Probe,
        *,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        workers: int = WORKERS,
    ) -> None:
        self.registry = registry
        self.liveness = liveness
        self.readiness = readiness
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        host, port = address
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.socket(family, kind, proto)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(sockaddr)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._answers: queue.SimpleQueue[tuple[_Connection, bytes]] = queue.SimpleQueue()
        self._connections: dict[socket.socket, _Connection] = {}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="health-worker")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for conn in list(self._connections.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_read, self._wake_write):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()

    # ---- the reading/writing thread ------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _serve(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            wait = min([0.5] + [max(0.0, c.deadline - now) for c in self._connections.values()])
            for key, events in self._selector.select(wait):
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake_read:
                    self._take_answers()
                else:
                    conn = self._connections.get(sock)  # type: ignore[call-overload]
                    if conn is None:
                        continue
                    if events & selectors.EVENT_READ:
                        self._read(conn)
                    if events & selectors.EVENT_WRITE and not conn.closed:
                        self._write(conn)
            now = time.monotonic()
            for conn in [c for c in self._connections.values() if c.deadline <= now]:
                self._close(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: try again on the next event
                return
            if len(self._connections) >= self.max_connections:
                waiting = [c for c in self._connections.values() if c.reading]
                if not waiting:
                    sock.close()
                    continue
                self._close(min(waiting, key=lambda c: c.deadline))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self.request_timeout)
            self._connections[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            end = conn.received.find(b"\n\n")
        if end < 0 and len(conn.received) <= MAX_HEADER_BYTES:
            return
        conn.reading = False
        self._selector.unregister(conn.sock)
        if end < 0:
            self._answer(conn, response(431, b"request too large\n", "text/plain"))
            return
        request = bytes(conn.received[:end])
        self._pool.submit(self._respond, conn, request)

    def _answer(self, conn: _Connection, answer: bytes) -> None:
        if conn.closed:
            return
        conn.answer = answer
        self._selector.register(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _take_answers(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_read.recv(4096):
                pass
        while True:
            try:
                conn, answer = self._answers.get_nowait()
            except queue.Empty:
                return
            self._answer(conn, answer)

    def _write(self, conn: _Connection) -> None:
        try:
            conn.sent += conn.sock.send(conn.answer[conn.sent :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.sent >= len(conn.answer):
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    # ---- the workers ---------------------------------------------------------------------

    def _respond(self, conn: _Connection, request: bytes) -> None:
        try:
            answer = self.handle(request)
        except Exception:  # a probe that raises is a 500, never a dead worker
            answer = response(500, b"internal error\n", "text/plain")
        self._answers.put((conn, answer))
        self._wake()

    def handle(self, request: bytes) -> bytes:
        """The answer to one request (its request line and headers)."""
        line = request.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return response(400, b"bad request\n", "text/plain")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return response(405, b"only GET and HEAD\n", "text/plain")
        head = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST, head=head)
        if path in ("/healthz", "/readyz"):
            probe = self.liveness if path == "/healthz" else self.readiness
            ok, detail = probe()
            body = json.dumps({"ok": ok, **detail}).encode()
            return response(200 if ok else 503, body, "application/json", head=head)
        return response(404, b"not found\n", "text/plain", head=head)
