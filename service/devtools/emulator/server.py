"""HTTP front of the emulator: a real threaded server (stdlib), one ``Account`` behind a lock.

Besides AC's routes under ``/api/3`` it serves an inspection API for tests and humans under
``/_emulator`` (no token needed): ``GET state``, ``GET requests``, ``POST faults``,
``POST exclusions``, ``POST self-unsubscribe``, ``POST reset``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from service.devtools.emulator.state import Account, Response


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log (the request log is in the account)."""

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        account = self.server.account
        if parts.path.startswith("/_emulator/"):
            self._inspect(method, parts.path.removeprefix("/_emulator/"), parts.query, body)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        with account.lock:
            response = account.handle(method, parts.path, parts.query, headers, body, time.time())
        if response.delay > 0:
            time.sleep(response.delay)
        self._send(response)

    def _send(self, response: Response) -> None:
        if response.html is not None:
            payload = response.html.encode()
            content_type = "text/html; charset=utf-8"
        else:
            payload = json.dumps(response.body).encode()
            content_type = "application/json"
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): exactly what a slow AC does to it

    def _inspect(self, method: str, path: str, query: str, body: bytes) -> None:
        account = self.server.account
        now = time.time()
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            self._send(Response(400, {"error": "body is not JSON"}))
            return
        with account.lock:
            if method == "GET" and path == "state":
                result: Any = account.snapshot(now)
            elif method == "GET" and path == "requests":
                since = float(params.get("since", "0"))
                result = {"now": now, "requests": [asdict(r) for r in account.log if r.t >= since]}
            elif method == "POST" and path == "faults":
                try:
                    result = asdict(account.set_faults(data, now))
                except (ValueError, TypeError) as exc:
                    self._send(Response(400, {"error": str(exc)}))
                    return
            elif method == "POST" and path == "exclusions":
                account.exclusions.update(e.strip().lower() for e in data.get("emails", []))
                result = {"exclusions": sorted(account.exclusions)}
            elif method == "POST" and path == "self-unsubscribe":
                result = {"ok": account.self_unsubscribe(data["email"], data["list"])}
            elif method == "POST" and path == "delete-list":
                result = {"ok": account.delete_list(data["list"])}
            elif method == "POST" and path == "reset":
                account.reset()
                result = {"ok": True}
            elif method == "GET" and path == "health":
                result = {"ok": True}
            else:
                self._send(Response(404, {"error": f"no inspection route {method} {path}"}))
                return
        self._send(Response(200, result))


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], account: Account) -> None:
        super().__init__(address, _Handler)
        self.account = account


class Emulator:
    """Runs the emulator on a background thread (tests, the demo) or in the foreground (CLI)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: set[str],
        rate_limit: float = 5.0,
        import_delay: float = 2.0,
        seed: int | None = None,
    ) -> None:
        self.account = Account(tokens, rate_limit=rate_limit, import_delay=import_delay, seed=seed)
        self.httpd = EmulatorHTTPServer((host, port), self.account)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Emulator:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="ac-emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
