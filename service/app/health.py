"""``/metrics``, ``/healthz`` and ``/readyz`` on ``METRICS_PORT`` (a small threaded server).

Liveness is only "the main loop still iterates": AC or Kafka being down never fails it (a restart
fixes neither and adds a rebalance). Readiness is "assigned, connected, token accepted".
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: probes would drown the service's own lines."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            probe = self.server.liveness if path == "/healthz" else self.server.readiness
            ok, detail = probe()
            body = json.dumps({"ok": ok, **detail}).encode()
            self._send(200 if ok else 503, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        liveness: Probe,
        readiness: Probe,
    ) -> None:
        super().__init__(address, _Handler)
        self.registry = registry
        self.liveness = liveness
        self.readiness = readiness
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> HealthServer:
        self._thread = threading.Thread(target=self.serve_forever, name="health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
