"""HTTP front of the emulator: a real threaded server (stdlib), one ``Account`` behind a lock.

Besides AC's routes under ``/api/3`` it serves an inspection API for tests and humans under
``/_emulator``: ``GET state``, ``GET requests``, ``GET health``, ``POST faults``,
``POST exclusions``, ``POST self-unsubscribe``, ``POST delete-list``, ``POST reset``. Every inspection request needs
an ``Api-Token`` header holding one of the emulator's tokens (403 otherwise), whatever the
faults say: the state holds every contact's email, and the routes change the account.

The emulator's tokens are always given explicitly (``--token`` or ``EMULATOR_TOKEN``, see
``emulator_token``): never ``AC_API_TOKEN``, which in a production pod is the real token.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from service.core.model import normalise_email
from service.devtools.emulator.state import Account, Response

TOKEN_VARIABLE = "EMULATOR_TOKEN"  # noqa: S105 - the name of a variable, not a token


def emulator_token(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The token the emulator accepts: ``explicit`` (``--token``), else ``EMULATOR_TOKEN``.
    Never ``AC_API_TOKEN``: in a production pod that is the real account's token, and an
    emulator started there must not accept (or be inspected with) it."""
    return explicit or environ.get(TOKEN_VARIABLE) or None


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
            if not self._may_inspect():
                self._send(Response(403, {"error": "an Api-Token header the emulator accepts"}))
                return
            self._inspect(method, parts.path.removeprefix("/_emulator/"), parts.query, body)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        with account.lock:
            response = account.handle(method, parts.path, parts.query, headers, body, time.time())
        if response.delay > 0:
            time.sleep(response.delay)
        self._send(response)

    def _may_inspect(self) -> bool:
        given = (self.headers.get("Api-Token") or "").encode()
        return any(hmac.compare_digest(given, token.encode()) for token in self.server.tokens)

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
            try:
                response = self._route(account, method, path, params, data, now)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                response = Response(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
        self._send(response)

    @staticmethod
    def _route(
        account: Account,
        method: str,
        path: str,
        params: dict[str, str],
        data: Any,
        now: float,
    ) -> Response:
        if method == "GET" and path == "state":
            return Response(200, account.snapshot(now))
        if method == "GET" and path == "requests":
            since = float(params.get("since", "0"))
            return Response(
                200, {"now": now, "requests": [asdict(r) for r in account.log if r.t >= since]}
            )
        if method == "POST" and path == "faults":
            return Response(200, asdict(account.set_faults(data, now)))
        if method == "POST" and path == "exclusions":
            account.exclusions.update(normalise_email(str(e)) for e in data.get("emails", []))
            return Response(200, {"exclusions": sorted(account.exclusions)})
        if method == "POST" and path == "self-unsubscribe":
            return Response(200, {"ok": account.self_unsubscribe(data["email"], data["list"])})
        if method == "POST" and path == "delete-list":
            return Response(200, {"ok": account.delete_list(data["list"])})
        if method == "POST" and path == "reset":
            account.reset()
            return Response(200, {"ok": True})
        if method == "GET" and path == "health":
            return Response(200, {"ok": True})
        return Response(404, {"error": f"no inspection route {method} {path}"})


class EmulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], account: Account) -> None:
        super().__init__(address, _Handler)
        self.account = account
        # The inspection API's tokens: the account's at start (faults never change these).
        self.tokens = frozenset(account.tokens)


class Emulator:
    """Runs the emulator on a background thread (tests, the demo) or in the foreground (CLI).

    ``tokens``: the Api-Tokens it accepts, for AC's routes and its inspection API alike; at
    least one, none empty (``emulator_token`` reads the CLI's)."""

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
        if not tokens or not all(tokens):
            raise ValueError("the emulator needs a token (--token or EMULATOR_TOKEN)")
        self.account = Account(tokens, rate_limit=rate_limit, import_delay=import_delay, seed=seed)
        self.httpd = EmulatorHTTPServer((host, port), self.account)
        self._thread: threading.Thread | None = None

    @property
    def inspection_headers(self) -> dict[str, str]:
        """Headers for the ``/_emulator`` routes (one of the accepted tokens)."""
        return {"Api-Token": min(self.httpd.tokens)}

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
