"""The schema registry adapter: confluent's client against its ``mock://`` registry and against a
real HTTP stand-in (a stdlib server serving ``/schemas/ids/N``) that goes down and comes back,
with basic auth, a bearer token and mutual TLS."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import itertools
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaReference
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.adapters.schema_registry import SchemaRegistryLookup, registry_config
from service.core.codec import EventDecoder, confluent_frame, encode_event, load_reader_schema
from service.core.errors import PoisonMessage, SchemaUnavailable
from service.core.model import MembershipEvent

READER = load_reader_schema(logical_types=False)
OURS = (Path(__file__).parents[2] / "schemas/segment_membership_change.avsc").read_text()
NEWER = json.loads(OURS)
NEWER["fields"].append({"name": "score", "type": "double", "default": 0.0})


def record(i: int) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "occurred_at": 1_767_225_600_000 + i,
        "email": f"Person{i}@Example.com",
        "audience_id": "a1",
        "audience_name": "VIP",
        "action": "ENTERED" if i % 3 else "EXITED",
        "campaign_id": None,
        "treatment_group": None,
        "attributes": {},
    }


NEWER_PARSED = fastavro.parse_schema(NEWER)


def value(schema_id: int, i: int) -> bytes:
    """Record ``i`` framed with ``schema_id``: written with NEWER for id 2, ours otherwise."""
    if schema_id == 2:
        return confluent_frame(2, encode_event({**record(i), "score": 0.5}, NEWER_PARSED))
    return confluent_frame(schema_id, encode_event(record(i), READER))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- confluent's in-memory registry ---------------------------------------------------------------


def test_mock_registry_schemas_by_id() -> None:
    lookup = SchemaRegistryLookup("mock://registry")
    ours = lookup.client.register_schema("t-value", Schema(OURS, "AVRO"))
    proto = lookup.client.register_schema(
        "p", Schema('syntax = "proto3"; message M {}', "PROTOBUF")
    )
    referring = lookup.client.register_schema(
        "r",
        Schema(
            '{"type":"record","name":"R","fields":[{"name":"x","type":"com.Other"}]}',
            "AVRO",
            [SchemaReference("com.Other", "other", 1)],
        ),
    )
    decoder = EventDecoder(READER, lookup)
    got = decoder.decode_batch(
        [value(ours, 1), value(proto, 2), value(referring, 3), value(999, 4), value(ours, 5)]
    )
    assert [getattr(item, "reason", getattr(item, "email", None)) for item in got] == [
        "person1@example.com",
        "incompatible_schema",
        "incompatible_schema",
        "unknown_schema",
        "person5@example.com",
    ]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {}),
        (
            {"basic_auth_user": "u", "basic_auth_password": "p:w"},
            {"basic.auth.user.info": "u:p:w"},
        ),
        (
            {"bearer_token": "tok", "bearer_logical_cluster": "lsrc-1"},
            {
                "bearer.auth.credentials.source": "STATIC_TOKEN",
                "bearer.auth.token": "tok",
                "bearer.auth.logical.cluster": "lsrc-1",
            },
        ),
        (
            {"ca_location": "/ca.pem", "cert_location": "/c.pem", "key_location": "/k.pem"},
            {
                "ssl.ca.location": "/ca.pem",
                "ssl.certificate.location": "/c.pem",
                "ssl.key.location": "/k.pem",
            },
        ),
    ],
)
def test_registry_config(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    config = registry_config("https://registry.example:8081/", timeout=3, **settings)
    assert config == {
        "url": "https://registry.example:8081",
        "timeout": 3.0,
        "max.retries": 0,  # no sleeping retries on the consumer's thread
        "cache.capacity": 1000,
        **expected,
    }


@pytest.mark.parametrize(
    ("url", "settings"),
    [
        ("https://user:secret@registry.example", {}),  # credentials stay out of URLs and logs
        ("ftp://registry.example", {}),
        ("https://a.example,https://b.example", {}),
        ("https://registry.example?x=1", {}),
        ("https://registry.example", {"basic_auth_user": "u"}),
        ("https://registry.example", {"basic_auth_user": "u:x", "basic_auth_password": "p"}),
        (
            "https://registry.example",
            {"basic_auth_user": "u", "basic_auth_password": "p", "bearer_token": "t"},
        ),
        ("https://registry.example", {"bearer_token": ""}),
        ("https://registry.example", {"key_location": "/k.pem"}),
        ("https://registry.example", {"timeout": 0}),
    ],
)
def test_registry_settings_that_cannot_work_are_refused(url: str, settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        SchemaRegistryLookup(url, **settings)
    assert "secret" not in str(info.value)


# --- A real HTTP registry stand-in ----------------------------------------------------------------


class RegistryStandIn(ThreadingHTTPServer):
    """``GET /schemas/ids/N`` as a Confluent registry answers it. ``failing``: answer 503;
    ``authorization``: the header every request must carry (else 401)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.schemas: dict[int, str] = {}
        self.failing = False
        self.authorization: str | None = None
        self.requests: list[str] = []
        self.headers_seen: list[dict[str, str]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server: RegistryStandIn

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        registry = self.server
        registry.requests.append(self.path)
        registry.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        if registry.failing:
            self._answer(503, {"error_code": 50301, "message": "unavailable"})
        elif registry.authorization and self.headers.get("Authorization") != registry.authorization:
            self._answer(401, {"error_code": 40101, "message": "unauthorized"})
        elif not self.path.startswith("/schemas/ids/"):
            self._answer(404, None)  # a plain 404 (a proxy, a wrong path): not a registry answer
        else:
            schema_id = int(self.path.rsplit("/", 1)[1].split("?")[0])
            if schema_id in registry.schemas:
                self._answer(200, {"schema": registry.schemas[schema_id]})
            else:
                self._answer(404, {"error_code": 40403, "message": f"Schema {schema_id} not found"})

    def _answer(self, status: int, body: Any) -> None:
        payload = b"<html>Not Found</html>" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type",
            "text/html" if body is None else "application/vnd.schemaregistry.v1+json",
        )
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def registry() -> Iterator[RegistryStandIn]:
    server = RegistryStandIn()
    server.schemas = {1: OURS, 2: json.dumps(NEWER)}
    try:
        yield server
    finally:
        server.stop()


def test_an_unknown_id_is_one_request_for_a_thousand_records(registry: RegistryStandIn) -> None:
    decoder = EventDecoder(READER, SchemaRegistryLookup(f"http://127.0.0.1:{registry.port}"))
    got = decoder.decode_batch([value(77, i) for i in range(1000)])
    assert {getattr(item, "reason", None) for item in got} == {"unknown_schema"}
    assert registry.requests == ["/schemas/ids/77"]


def test_a_plain_404_is_a_configuration_problem_not_an_unknown_schema(
    registry: RegistryStandIn,
) -> None:
    decoder = EventDecoder(READER, SchemaRegistryLookup(f"http://127.0.0.1:{registry.port}/wrong"))
    got = decoder.decode_batch([value(1, 1)])[0]
    assert isinstance(got, SchemaUnavailable)
    assert "404" in got.detail


def test_basic_auth_and_a_refusal_of_our_credentials(registry: RegistryStandIn) -> None:
    registry.authorization = "Basic " + base64.b64encode(b"sync:pa:ss").decode()
    url = f"http://127.0.0.1:{registry.port}"
    good = EventDecoder(
        READER, SchemaRegistryLookup(url, basic_auth_user="sync", basic_auth_password="pa:ss")
    )
    assert isinstance(good.decode(value(1, 1)), MembershipEvent)
    wrong = EventDecoder(
        READER, SchemaRegistryLookup(url, basic_auth_user="sync", basic_auth_password="nope")
    )
    refused = wrong.decode_batch([value(1, 1)])[0]
    assert isinstance(refused, SchemaUnavailable)  # our credentials: never the record's fault
    assert "401" in refused.detail and "nope" not in refused.detail


def test_a_bearer_token_is_sent(registry: RegistryStandIn) -> None:
    registry.authorization = "Bearer tok-123"
    lookup = SchemaRegistryLookup(
        f"http://127.0.0.1:{registry.port}", bearer_token="tok-123", bearer_logical_cluster="lsrc-9"
    )
    assert isinstance(EventDecoder(READER, lookup).decode(value(2, 1)), MembershipEvent)
    assert registry.headers_seen[-1]["target-sr-cluster"] == "lsrc-9"


def test_an_outage_then_every_record_exactly_once(registry: RegistryStandIn) -> None:
    """The pipeline's side, played here: decode a batch, apply the events up to the first
    SchemaUnavailable, read from there again on the next turn. The registry refuses
    connections, then answers 503, then comes back: every record is decoded exactly once, in
    order, none is refused, and the registry is asked at most once per back-off interval."""
    port = registry.port
    clock = Clock()
    asked: list[tuple[float, int]] = []
    lookup = SchemaRegistryLookup(f"http://127.0.0.1:{port}", timeout=2)

    def counting(schema_id: int) -> Any:
        asked.append((clock.now, schema_id))
        return lookup(schema_id)

    decoder = EventDecoder(READER, counting, clock=clock, backoff_base=0.5, backoff_cap=4.0)
    backlog = [value(1 + i % 2, i) for i in range(300)]
    applied: list[str] = []
    position = 0
    registry.stop()  # connection refused

    def turn() -> None:
        nonlocal position
        for item in decoder.decode_batch(backlog[position : position + 50]):
            if isinstance(item, SchemaUnavailable):
                assert item.retry_after > 0
                return  # seek back: read from here again later
            assert isinstance(item, MembershipEvent), item
            applied.append(item.event_id)
            position += 1

    for _ in range(40):  # 10 s of turns, every 0.25 s
        turn()
        clock.now += 0.25
    refused_phase = len(asked)
    revived = RegistryStandIn(port)
    revived.schemas = registry.schemas
    try:
        revived.failing = True  # 503
        for _ in range(40):
            turn()
            clock.now += 0.25
        assert applied == []
        # Per schema id, one probe per back-off interval (0.5, 1, 2, 4, 4 ... s), never one
        # per record: 20 s of outage, 80 turns of 50 records, 8 probes of each id.
        for schema_id in (1, 2):
            times = [t for t, asked_id in asked if asked_id == schema_id]
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
        assert len(revived.requests) == len(asked) - refused_phase >= 2
        revived.failing = False
        for _ in range(40):
            turn()
            clock.now += 0.25
            if position == len(backlog):
                break
    finally:
        revived.stop()
    assert applied == [f"e{i}" for i in range(300)]
    assert sorted({schema_id for _, schema_id in asked}) == [1, 2]


# --- Mutual TLS -------------------------------------------------------------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(
        subject: str, key: Any, issuer_key: Any, issuer: str, *, ca: bool, san: bool = False
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test CA", ca_key, ca_key, "test CA", ca=True)
    paths: dict[str, Path] = {}
    for role, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(role, key, ca_key, "test CA", ca=False, san=san)
        paths[f"{role}_cert"] = directory / f"{role}.pem"
        paths[f"{role}_key"] = directory / f"{role}.key"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    paths["ca"] = directory / "ca.pem"
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_mutual_tls_with_our_ca_and_a_client_certificate(tmp_path: Path) -> None:
    files = _certificates(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    tls.load_cert_chain(str(files["server_cert"]), str(files["server_key"]))
    tls.verify_mode = ssl.CERT_REQUIRED
    server = RegistryStandIn(tls=tls)
    server.schemas = {1: OURS}
    url = f"https://127.0.0.1:{server.port}"
    try:
        client = SchemaRegistryLookup(
            url,
            ca_location=str(files["ca"]),
            cert_location=str(files["client_cert"]),
            key_location=str(files["client_key"]),
        )
        assert isinstance(EventDecoder(READER, client).decode(value(1, 1)), MembershipEvent)
        # Without a client certificate, or without our CA, nothing is fetched, nothing parked.
        for lookup in (
            SchemaRegistryLookup(url, ca_location=str(files["ca"])),
            SchemaRegistryLookup(url),
        ):
            assert isinstance(
                EventDecoder(READER, lookup).decode_batch([value(1, 1)])[0], SchemaUnavailable
            )
    finally:
        server.stop()


def test_a_poison_schema_from_the_registry_is_remembered(registry: RegistryStandIn) -> None:
    registry.schemas[9] = json.dumps(
        {"type": "record", "name": "R", "fields": [{"name": "x", "type": "int", "default": "zz"}]}
    )
    decoder = EventDecoder(READER, SchemaRegistryLookup(f"http://127.0.0.1:{registry.port}"))
    got = decoder.decode_batch([value(9, i) for i in range(200)])
    assert {item.reason for item in got if isinstance(item, PoisonMessage)} == {
        "incompatible_schema"
    }
    assert len(got) == 200
    assert registry.requests == ["/schemas/ids/9"]
