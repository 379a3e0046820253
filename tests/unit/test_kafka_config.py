"""The librdkafka properties, checked by building the clients (``check.validate_kafka_clients``):
every bad property named at once, secrets never echoed. No broker is needed: building a client
does not wait for one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.app.check import validate_kafka_clients
from service.app.logs import KAFKA_LOGGER, kafka_logger
from service.app.settings_loader import load_settings

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    "KAFKA_TOPIC": "audiences",
    "AC_API_URL": "https://acct.api-us1.com",
    "AC_API_TOKEN": "s3cret-token-value",
    "AC_LIST_SENDER_URL": "https://www.acme-corp.test",
}


def problems(**changes: str) -> list[tuple[str, str]]:
    return [(p.field, p.why) for p in validate_kafka_clients(load_settings({**BASE, **changes}))]


def test_a_good_configuration_has_no_problem() -> None:
    assert problems() == []
    assert problems(KAFKA_PROPERTY_SESSION_TIMEOUT_MS="6000", KAFKA_PROPERTY_LINGER_MS="5") == []


def test_a_bad_value_names_its_variable() -> None:
    [(field, why)] = problems(KAFKA_PROPERTY_SESSION_TIMEOUT_MS="abc")
    assert field == "KAFKA_PROPERTY_SESSION_TIMEOUT_MS"
    assert why.startswith("librdkafka: ")
    assert "session.timeout.ms" in why


def test_every_bad_property_is_named_at_once() -> None:
    found = problems(
        KAFKA_PROPERTY_SESSION_TIMEOUT_MS="abc",
        KAFKA_PROPERTY_NO_SUCH_THING="1",
        KAFKA_PROPERTY_LINGER_MS="soon",
    )
    assert [f for f, _ in found] == [
        "KAFKA_PROPERTY_LINGER_MS",
        "KAFKA_PROPERTY_NO_SUCH_THING",
        "KAFKA_PROPERTY_SESSION_TIMEOUT_MS",
    ]


def test_a_problem_between_properties_is_reported() -> None:
    [(field, why)] = problems(
        KAFKA_PROPERTY_SECURITY_PROTOCOL="SSL", KAFKA_PROPERTY_SSL_CA_LOCATION="/nonexistent/ca"
    )
    assert field == "KAFKA_PROPERTY_SSL_CA_LOCATION"
    assert "ssl.ca.location" in why


def test_sasl_with_credentials_from_files_builds(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("sync\n")
    (tmp_path / "password").write_text("pw-xyz-123\n")
    settings = load_settings(
        {
            **BASE,
            "KAFKA_PROPERTY_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_PROPERTY_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_PROPERTY_SASL_USERNAME_FILE": str(tmp_path / "user"),
            "KAFKA_PROPERTY_SASL_PASSWORD_FILE": str(tmp_path / "password"),
        }
    )
    assert validate_kafka_clients(settings) == []


def test_a_secret_is_never_echoed(tmp_path: Path) -> None:
    # The secret is the value librdkafka complains about (a password pasted as the mechanism
    # makes librdkafka print "Unsupported SASL mechanism: <value>"); it is redacted only if it
    # is a secret, so set the same value as a password too.
    secret = "hunter2-pw-9f8e"
    (tmp_path / "password").write_text(secret)
    found = problems(
        KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_PROPERTY_SASL_MECHANISM=secret,
        KAFKA_PROPERTY_SASL_USERNAME="u",
        KAFKA_PROPERTY_SASL_PASSWORD_FILE=str(tmp_path / "password"),
    )
    assert found, "an unsupported mechanism must be refused"
    assert all(secret not in why for _, why in found)
    assert any("***" in why for _, why in found)


@pytest.mark.parametrize("kind", ["consumer", "producer"])
def test_every_client_config_routes_librdkafka_logs_to_python(kind: str) -> None:
    settings = load_settings(BASE)
    config = settings.consumer_config() if kind == "consumer" else settings.producer_config()
    assert config["logger"] is kafka_logger()
    assert isinstance(config["logger"], logging.Logger)
    assert config["logger"].name == KAFKA_LOGGER
