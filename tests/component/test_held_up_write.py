"""A request whose write is held up after its slot (its thread waits for the GIL between socket
writes while the main thread decodes a batch) must not reach AC bunched with the next slot's
request. Real limiter, real httpx transport, a real HTTP server that logs when each request
has fully arrived; the hold-up is a body whose last chunk comes 0.2 s after the first."""

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from service.adapters.ratelimit import RateLimitedTransport, RateLimiter

HOLD_UP = 0.2  # past the guard (0.04 s), within one interval (0.24 s at 5/s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    arrivals: dict[str, float]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        # ``Transfer-Encoding: chunked`` (a streamed body) or ``Content-Length``: read it all.
        if self.headers.get("Transfer-Encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                self.rfile.read(size + 2)
                if size == 0:
                    break
        else:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.arrivals[self.path] = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = _answer
    do_POST = _answer


def held_up_body() -> Iterator[bytes]:
    yield b'{"contacts": ['
    time.sleep(HOLD_UP)
    yield b"]}"


def test_the_slot_after_a_held_up_write_keeps_a_full_interval_from_it() -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.arrivals = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    limiter = RateLimiter(5, guard=0.04, clock=time.monotonic)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with httpx.Client(transport=RateLimitedTransport(httpx.HTTPTransport(), limiter)) as c:
            c.get(f"{base}/warm")  # a connection is open: the next requests only write
            warm_next = limiter.bucket.next_free
            first = threading.Thread(target=lambda: c.post(f"{base}/held", content=held_up_body()))
            first.start()
            while limiter.bucket.next_free == warm_next:  # until it has booked its slot
                time.sleep(0.001)
            slot = limiter.bucket.next_free - limiter.bucket.interval
            time.sleep(max(0.0, slot - time.monotonic()) + 0.02)  # it is writing, held up
            c.get(f"{base}/next")  # books the slot after it
            first.join(5)
    finally:
        server.shutdown()
        server.server_close()
    held, following = server.arrivals["/held"], server.arrivals["/next"]
    # Without ``sent`` the next request left on its booked slot, ~0.04 s after the held-up one
    # arrived; AC counts both, and a sixth in the same second follows.
    assert following - held >= 0.24 - 0.01


def test_the_callers_own_trace_hook_still_runs_once_per_event_when_sent_again() -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.arrivals = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    starts: list[float] = []

    class Recording(RateLimiter):
        def sent(self, start: float) -> None:
            starts.append(start)
            super().sent(start)

    limiter = Recording(1000, guard=0.0, clock=time.monotonic)
    events: list[str] = []
    try:
        with httpx.Client(transport=RateLimitedTransport(httpx.HTTPTransport(), limiter)) as c:
            request = c.build_request(
                "GET",
                f"http://127.0.0.1:{server.server_address[1]}/x",
                extensions={"trace": lambda name, info: events.append(name)},
            )
            c.send(request)
            c.send(request)  # the same object again (a retry): its hook is not wrapped twice
    finally:
        server.shutdown()
        server.server_close()
    written = [e for e in events if e.endswith("send_request_body.complete")]
    assert len(written) == 2
    assert len(starts) == 2 and starts[0] < starts[1]  # each send told its own slot, once
