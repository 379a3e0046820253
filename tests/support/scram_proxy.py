"""A SASL/SCRAM-SHA-512 gate in front of a Kafka broker, for the SASL integration test.

Tansu 0.6 speaks SCRAM (``--authentication``), but its ``user create`` tool cannot add a user to
a broker that requires authentication, and its storage is in memory: a test cannot provision a
user there. So the broker runs without authentication behind this proxy, which does what an
authenticating broker does on every connection: it answers ``SaslHandshake`` (v1) and
``SaslAuthenticate`` (v0-v2) itself, verifying the client's SCRAM proof against the password it
was given (RFC 5802 / 7677), refuses every other request before a successful authentication
(the connection is closed, as Kafka does), and afterwards forwards the connection's bytes to
the broker untouched. ``ApiVersions`` is forwarded before authentication, as Kafka allows.

The broker must advertise the proxy's address, so that every connection the clients open goes
through it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field

SASL_HANDSHAKE = 17
API_VERSIONS = 18
SASL_AUTHENTICATE = 36
SASL_AUTHENTICATION_FAILED = 58
ITERATIONS = 4096


def _uvarint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _put_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _skip_tags(data: bytes, at: int) -> int:
    count, at = _uvarint(data, at)
    for _ in range(count):
        _tag, at = _uvarint(data, at)
        size, at = _uvarint(data, at)
        at += size
    return at


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("closed")
        chunks += chunk
    return bytes(chunks)


class ScramServer:
    """One SCRAM-SHA-512 exchange (server side) against known users' passwords."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.user: str | None = None
        self._client_first_bare = ""
        self._server_first = ""
        self._salted = b""

    def first(self, message: str) -> str | None:
        """The client-first message -> server-first, or None (unknown user, bad message)."""
        if not message.startswith("n,,"):
            return None
        bare = message[3:]
        attrs = dict(item.split("=", 1) for item in bare.split(",") if "=" in item)
        user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
        if user not in self.users or "r" not in attrs:
            return None
        salt = secrets.token_bytes(16)
        nonce = attrs["r"] + base64.b64encode(secrets.token_bytes(18)).decode()
        self.user = user
        self._client_first_bare = bare
        self._server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
        self._salted = hashlib.pbkdf2_hmac("sha512", self.users[user].encode(), salt, ITERATIONS)
        return self._server_first

    def final(self, message: str) -> str | None:
        """The client-final message -> server-final, or None when the proof is wrong."""
        without_proof, sep, proof = message.rpartition(",p=")
        if not sep:
            return None
        auth = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = hmac.digest(self._salted, b"Client Key", "sha512")
        stored_key = hashlib.sha512(client_key).digest()
        signature = hmac.digest(stored_key, auth, "sha512")
        expected = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        try:
            given = base64.b64decode(proof)
        except ValueError:
            return None
        if not hmac.compare_digest(given, expected):
            return None
        server_key = hmac.digest(self._salted, b"Server Key", "sha512")
        return "v=" + base64.b64encode(hmac.digest(server_key, auth, "sha512")).decode()


@dataclass
class ScramProxy:
    upstream: tuple[str, int]
    users: dict[str, str]
    port: int = 0
    authenticated: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    rejected_before_auth: int = 0

    def start(self) -> ScramProxy:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets += [client, upstream]
        write_lock = threading.Lock()
        threading.Thread(
            target=self._relay, args=(upstream, client, write_lock), daemon=True
        ).start()
        scram = ScramServer(self.users)
        done = False
        try:
            while True:
                size = struct.unpack(">i", _recv_exactly(client, 4))[0]
                frame = _recv_exactly(client, size)
                if done:
                    upstream.sendall(struct.pack(">i", size) + frame)
                    continue
                api_key, version, correlation = struct.unpack(">hhi", frame[:8])
                if api_key == API_VERSIONS:
                    upstream.sendall(struct.pack(">i", size) + frame)
                elif api_key == SASL_HANDSHAKE and version == 1:
                    answer = self._handshake(frame, correlation)
                    with write_lock:
                        client.sendall(answer)
                elif api_key == SASL_AUTHENTICATE:
                    answer, outcome = self._authenticate(scram, frame, version, correlation)
                    with write_lock:
                        client.sendall(answer)
                    if outcome is False:
                        self.refused.append(scram.user or "?")
                        break
                    if outcome is True:
                        self.authenticated.append(scram.user or "?")
                        done = True
                else:  # anything else before authentication: refused, connection closed
                    self.rejected_before_auth += 1
                    break
        except (ConnectionError, OSError, struct.error, IndexError, ValueError):
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    @staticmethod
    def _relay(source: socket.socket, target: socket.socket, lock: threading.Lock) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with lock:
                    target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _body_at(frame: bytes, flexible: bool) -> int:
        """Where the request body starts (after the v1 or v2 request header)."""
        client_id_len = struct.unpack(">h", frame[8:10])[0]
        at = 10 + max(0, client_id_len)
        return _skip_tags(frame, at) if flexible else at

    def _handshake(self, frame: bytes, correlation: int) -> bytes:
        at = self._body_at(frame, flexible=False)
        length = struct.unpack(">h", frame[at : at + 2])[0]
        mechanism = frame[at + 2 : at + 2 + length].decode()
        error = 0 if mechanism == "SCRAM-SHA-512" else 33  # UNSUPPORTED_SASL_MECHANISM
        body = struct.pack(">ihi", correlation, error, 1)
        body += struct.pack(">h", len(b"SCRAM-SHA-512")) + b"SCRAM-SHA-512"
        return struct.pack(">i", len(body)) + body

    def _authenticate(
        self, scram: ScramServer, frame: bytes, version: int, correlation: int
    ) -> tuple[bytes, bool | None]:
        flexible = version >= 2
        at = self._body_at(frame, flexible)
        if flexible:
            length, at = _uvarint(frame, at)
            token = frame[at : at + length - 1]
        else:
            length = struct.unpack(">i", frame[at : at + 4])[0]
            token = frame[at + 4 : at + 4 + length]
        message = token.decode()
        outcome: bool | None
        if scram.user is None:
            reply = scram.first(message)
            outcome = None if reply is not None else False
        else:
            reply = scram.final(message)
            outcome = reply is not None
        if reply is None:
            error, text, data = SASL_AUTHENTICATION_FAILED, "Authentication failed", b""
        else:
            error, text, data = 0, None, reply.encode()
        if flexible:
            body = struct.pack(">i", correlation) + _put_uvarint(0)
            body += struct.pack(">h", error)
            body += _put_uvarint(0) if text is None else _put_uvarint(len(text) + 1) + text.encode()
            body += _put_uvarint(len(data) + 1) + data
            body += struct.pack(">q", 0) + _put_uvarint(0)
        else:
            body = struct.pack(">ih", correlation, error)
            body += (
                struct.pack(">h", -1)
                if text is None
                else struct.pack(">h", len(text)) + (text.encode())
            )
            body += struct.pack(">i", len(data)) + data
            if version >= 1:
                body += struct.pack(">q", 0)
        return struct.pack(">i", len(body)) + body, outcome
