from pathlib import Path

import pytest

from service.app.settings import ConfigProblems, ListTarget, problems_of
from service.app.settings_loader import load_settings
from service.core.errors import ConfigError

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
    "KAFKA_TOPIC": "audiences",
    "AC_API_URL": "https://acct.api-us1.com",
    "AC_API_TOKEN": "s3cret-token-value",
    "AC_LIST_SENDER_URL": "https://www.acme-corp.test",
}


def env(**changes: str | None) -> dict[str, str]:
    result = dict(BASE)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def test_defaults() -> None:
    s = load_settings(BASE)
    assert s.kafka_dlq_topic == "audiences.dlq"
    assert s.kafka_group_id == "ac-audience-sync"
    assert s.ac_rate_limit_per_second == 5.0
    assert s.ac_base_url == "https://acct.api-us1.com/api/3"
    assert s.list_name_template == "{audience_name}"
    assert s.coalesce_from_publish_time is True
    assert (
        load_settings(env(COALESCE_FROM_PUBLISH_TIME="false")).coalesce_from_publish_time is False
    )
    assert (s.read_ahead_max_keys, s.read_ahead_max_seconds) == (500_000, 120.0)
    off = load_settings(env(READ_AHEAD_MAX_KEYS="0", READ_AHEAD_MAX_SECONDS="5"))
    assert (off.read_ahead_max_keys, off.read_ahead_max_seconds) == (0, 5.0)


@pytest.mark.parametrize(
    "name", ["KAFKA_TOPIC", "KAFKA_BOOTSTRAP_SERVERS", "AC_API_URL", "AC_API_TOKEN"]
)
def test_missing_required_names_the_variable(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(**{name: None}))
    assert info.value.field == name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AC_RATE_LIMIT_PER_SECOND", "fast"),
        ("AC_RATE_LIMIT_PER_SECOND", "0"),
        ("COALESCE_WINDOW_SECONDS", "-1"),
        ("READ_AHEAD_MAX_KEYS", "-1"),
        ("READ_AHEAD_MAX_KEYS", "many"),
        ("READ_AHEAD_MAX_SECONDS", "-0.5"),
        ("METRICS_PORT", "70000"),
        ("METRICS_PORT", "12.5"),
        ("LOG_LEVEL", "LOUD"),
        ("AC_API_URL", "acct.api-us1.com"),
        ("LIST_NAME_TEMPLATE", "{audience_name}-{email}"),
        ("LIST_NAME_TEMPLATE", "{audience_name"),
        ("AC_CREATE_LISTS", "maybe"),
        ("AC_FIELD_MAP", "favourite=colour"),
    ],
)
def test_malformed_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(**{name: value}))
    assert info.value.field == name
    assert [p.field for p in problems_of(info.value)] == [name]


def test_token_never_printed() -> None:
    s = load_settings(BASE)
    assert "s3cret" not in repr(s)
    assert "s3cret" not in str(s.ac_api_token)
    assert s.ac_api_token.reveal() == "s3cret-token-value"


def test_bad_url_error_does_not_echo_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(AC_API_URL="s3cret-token-value"))
    assert "s3cret" not in str(info.value)


def test_kafka_properties_and_forced_manual_commit() -> None:
    s = load_settings(
        env(
            KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_PROPERTY_SASL_MECHANISM="SCRAM-SHA-512",
            KAFKA_PROPERTY_SASL_USERNAME="sync",
            KAFKA_PROPERTY_SASL_PASSWORD="pw-1",
            KAFKA_PROPERTY_SESSION_TIMEOUT_MS="6000",
        )
    )
    cfg = s.consumer_config()
    assert cfg["security.protocol"] == "SASL_SSL"
    assert cfg["sasl.mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl.username"] == "sync"
    assert cfg["sasl.password"] == "pw-1"
    assert cfg["session.timeout.ms"] == "6000"
    assert cfg["enable.auto.commit"] == "false"
    assert cfg["partition.assignment.strategy"] == "cooperative-sticky"
    assert s.producer_config()["security.protocol"] == "SASL_SSL"
    assert "session.timeout.ms" not in s.producer_config()


def test_the_group_consumer_prefetches_less_than_the_readers_unless_the_user_says() -> None:
    s = load_settings(env())
    group, reader = s.group_consumer_config(), s.consumer_config()
    assert group["queued.max.messages.kbytes"] == "8192"
    assert group["fetch.max.bytes"] == str(4 * 1024 * 1024)
    assert reader["queued.max.messages.kbytes"] == "16384"
    assert "fetch.max.bytes" not in reader  # librdkafka's default for the private readers
    assert {k: v for k, v in group.items() if k not in _PREFETCH} == {
        k: v for k, v in reader.items() if k not in _PREFETCH
    }
    mine = load_settings(
        env(
            KAFKA_PROPERTY_QUEUED_MAX_MESSAGES_KBYTES="32768",
            KAFKA_PROPERTY_FETCH_MAX_BYTES="1048576",
        )
    ).group_consumer_config()
    assert (mine["queued.max.messages.kbytes"], mine["fetch.max.bytes"]) == ("32768", "1048576")


_PREFETCH = ("queued.max.messages.kbytes", "fetch.max.bytes", "logger")


def test_auto_commit_cannot_be_turned_on() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(KAFKA_PROPERTY_ENABLE_AUTO_COMMIT="true"))
    assert info.value.field == "KAFKA_PROPERTY_ENABLE_AUTO_COMMIT"


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    s = load_settings(env(AC_API_TOKEN=None, AC_API_TOKEN_FILE=str(path)))
    assert s.current_token().reveal() == "from-file"
    path.write_text("rotated")
    assert s.current_token().reveal() == "rotated"


def test_token_and_file_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x")
    with pytest.raises(ConfigError):
        load_settings(env(AC_API_TOKEN_FILE=str(path)))


def test_missing_token_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(AC_API_TOKEN=None, AC_API_TOKEN_FILE="/nonexistent/token"))
    assert info.value.field == "AC_API_TOKEN_FILE"


def test_list_mapping_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text('{"a1": {"list_id": 12}, "a2": "Newsletter", "a3": {"list_name": "VIP"}}')
    s = load_settings(env(LIST_MAPPING_FILE=str(path)))
    assert s.list_mapping == {
        "a1": ListTarget(list_id="12"),
        "a2": ListTarget(list_name="Newsletter"),
        "a3": ListTarget(list_name="VIP"),
    }
    path.write_text('{"a1": 5}')
    with pytest.raises(ConfigError) as info:
        load_settings(env(LIST_MAPPING_FILE=str(path)))
    assert info.value.field == "LIST_MAPPING_FILE"


# ---- every problem at once, no value echoed ---------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigProblems) as info:
        load_settings(
            env(
                KAFKA_TOPIC=None,
                AC_RATE_LIMIT_PER_SECOND="fast",
                METRICS_PORT="70000",
                LOG_LEVEL="LOUD",
                KAFKA_PROPERTY_ENABLE_AUTO_COMMIT="true",
                AC_API_URL="http://acct.api-us1.com",
            )
        )
    fields = [p.field for p in info.value.problems]
    assert sorted(fields) == sorted(
        [
            "KAFKA_TOPIC",
            "AC_RATE_LIMIT_PER_SECOND",
            "METRICS_PORT",
            "LOG_LEVEL",
            "KAFKA_PROPERTY_ENABLE_AUTO_COMMIT",
            "AC_API_URL",
        ]
    )
    assert "and 5 more" in str(info.value)


MARKER = "s3cret-PASTED-7f3a"


@pytest.mark.parametrize(
    "name",
    [
        "AC_API_URL",
        "SCHEMA_REGISTRY_URL",
        "AC_LIST_SENDER_URL",
        "AC_RATE_LIMIT_PER_SECOND",
        "AC_CONCURRENCY",
        "AC_REQUEST_TIMEOUT_SECONDS",
        "AC_CREATE_LISTS",
        "AC_BULK_IMPORT",
        "COALESCE_WINDOW_SECONDS",
        "COALESCE_FROM_PUBLISH_TIME",
        "MAX_PENDING_CHANGES",
        "READ_AHEAD_MAX_KEYS",
        "READ_AHEAD_MAX_SECONDS",
        "METRICS_PORT",
        "LOG_LEVEL",
        "AC_RATE_SHARE",
        "AC_ATTRIBUTE_MAP",
        "AC_FIELD_MAP",
        "LIST_NAME_TEMPLATE",
        "SCHEMA_REGISTRY_TIMEOUT_SECONDS",
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
    ],
)
def test_an_error_never_echoes_the_value(name: str) -> None:
    """A token pasted into the wrong variable must not reach a log through the error."""
    extra = {"SCHEMA_REGISTRY_URL": "https://sr.internal"} if "SCHEMA_REGISTRY_" in name else {}
    values = [MARKER, f"{{{MARKER}}}", f"https://{MARKER}@h.io/?q={MARKER}", f"x={MARKER}"]
    raised = 0
    for value in values:
        try:
            load_settings(env(**{**extra, name: value}))
        except ConfigError as exc:
            raised += 1
            assert MARKER not in str(exc)
            for problem in problems_of(exc):
                assert problem.field == name
                assert MARKER not in problem.why
    assert raised >= 1


# ---- secrets and *_FILE ----------------------------------------------------------------------


def secret_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def test_kafka_property_from_a_file_is_a_trimmed_secret(tmp_path: Path) -> None:
    s = load_settings(
        env(
            KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_PROPERTY_SASL_MECHANISM="SCRAM-SHA-512",
            KAFKA_PROPERTY_SASL_USERNAME_FILE=secret_file(tmp_path, "user", "sync-user\n"),
            KAFKA_PROPERTY_SASL_PASSWORD_FILE=secret_file(tmp_path, "pw", "  pw-from-file \n"),
        )
    )
    for cfg in (s.consumer_config(), s.producer_config()):
        assert cfg["sasl.username"] == "sync-user"
        assert cfg["sasl.password"] == "pw-from-file"
    assert "sasl.password" not in s.kafka_properties
    assert "pw-from-file" not in repr(s)
    assert "sasl.password.file" not in s.consumer_config()


def test_a_value_and_its_file_are_exclusive(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "pw", "x")
    cases = {
        "KAFKA_PROPERTY_SASL_PASSWORD": {
            "KAFKA_PROPERTY_SASL_PASSWORD": "y",
            "KAFKA_PROPERTY_SASL_PASSWORD_FILE": path,
        },
        "EMAIL_HASH_KEY": {"EMAIL_HASH_KEY": "y", "EMAIL_HASH_KEY_FILE": path},
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": {
            "SCHEMA_REGISTRY_URL": "https://sr.internal",
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "u:p",
            "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE": path,
        },
        "AC_API_TOKEN": {"AC_API_TOKEN_FILE": path},
    }
    for field, changes in cases.items():
        with pytest.raises(ConfigError) as info:
            load_settings(env(**changes))
        assert [p.field for p in problems_of(info.value)] == [field], field


@pytest.mark.parametrize(
    "name", ["KAFKA_PROPERTY_SASL_PASSWORD_FILE", "EMAIL_HASH_KEY_FILE", "AC_API_TOKEN_FILE"]
)
def test_an_unreadable_or_empty_secret_file_names_its_variable(name: str, tmp_path: Path) -> None:
    changes = {name: "/nonexistent/secret"}
    if name == "AC_API_TOKEN_FILE":
        changes["AC_API_TOKEN"] = None  # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        load_settings(env(**changes))
    assert [p.field for p in problems_of(info.value)] == [name]
    assert "/nonexistent/secret" in info.value.why
    changes[name] = secret_file(tmp_path, "empty", " \n")
    with pytest.raises(ConfigError) as info:
        load_settings(env(**changes))
    assert [p.field for p in problems_of(info.value)] == [name]
    assert "is empty" in info.value.why


def test_email_hash_key_from_a_file(tmp_path: Path) -> None:
    s = load_settings(env(EMAIL_HASH_KEY_FILE=secret_file(tmp_path, "k", "hash-key-1\n")))
    assert s.email_hash_key is not None
    assert s.email_hash_key.reveal() == "hash-key-1"


def test_repr_and_str_reveal_no_secret(tmp_path: Path) -> None:
    secrets = {
        "token": "tok-0a1b2c3d4e",
        "sasl": "sasl-pw-5f6a7b",
        "oauth": "oauth-secret-8c9d",
        "keypw": "ssl-key-pw-0e1f",
        "hash": "hash-key-2a3b",
        "srpw": "sr-pw-4c5d6e",
        "filed": "filed-secret-7f8a",
    }
    s = load_settings(
        env(
            AC_API_TOKEN=secrets["token"],
            KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_PROPERTY_SASL_MECHANISM="PLAIN",
            KAFKA_PROPERTY_SASL_USERNAME="sync",
            KAFKA_PROPERTY_SASL_PASSWORD=secrets["sasl"],
            KAFKA_PROPERTY_SASL_OAUTHBEARER_CLIENT_SECRET=secrets["oauth"],
            KAFKA_PROPERTY_SSL_KEY_PASSWORD=secrets["keypw"],
            KAFKA_PROPERTY_SSL_KEYSTORE_PASSWORD_FILE=secret_file(tmp_path, "ks", secrets["filed"]),
            EMAIL_HASH_KEY=secrets["hash"],
            SCHEMA_REGISTRY_URL="https://sr.internal:8081",
            SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=f"sync:{secrets['srpw']}",
        )
    )
    shown = repr(s) + str(s)
    for value in secrets.values():
        assert value not in shown
    assert s.consumer_config()["sasl.password"] == secrets["sasl"]
    assert s.consumer_config()["ssl.keystore.password"] == secrets["filed"]
    assert s.redact(f"a {secrets['srpw']} b {secrets['token']}") == "a *** b ***"


# ---- SASL ------------------------------------------------------------------------------------


def test_sasl_scram_without_credentials_names_the_variables_to_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            env(
                KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
                KAFKA_PROPERTY_SASL_MECHANISM="SCRAM-SHA-512",
            )
        )
    problems = problems_of(info.value)
    assert [p.field for p in problems] == [
        "KAFKA_PROPERTY_SASL_USERNAME",
        "KAFKA_PROPERTY_SASL_PASSWORD",
    ]
    assert "KAFKA_PROPERTY_SASL_PASSWORD_FILE" in problems[1].why
    assert "SCRAM-SHA-512" in problems[1].why


def test_sasl_without_a_mechanism_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL"))
    assert [p.field for p in problems_of(info.value)] == ["KAFKA_PROPERTY_SASL_MECHANISM"]


def test_oauthbearer_needs_no_password() -> None:
    s = load_settings(
        env(
            KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_PROPERTY_SASL_MECHANISM="OAUTHBEARER",
        )
    )
    assert s.consumer_config()["sasl.mechanism"] == "OAUTHBEARER"


# ---- schema registry -------------------------------------------------------------------------


def test_schema_registry_settings(tmp_path: Path) -> None:
    ca = secret_file(tmp_path, "ca.pem", "ca")
    cert = secret_file(tmp_path, "cert.pem", "cert")
    key = secret_file(tmp_path, "key.pem", "key")
    s = load_settings(
        env(
            SCHEMA_REGISTRY_URL="https://sr.internal:8081/prefix/",
            SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE=secret_file(tmp_path, "ui", "u:p:w\n"),
            SCHEMA_REGISTRY_CA_LOCATION=ca,
            SCHEMA_REGISTRY_CERT_LOCATION=cert,
            SCHEMA_REGISTRY_KEY_LOCATION=key,
            SCHEMA_REGISTRY_TIMEOUT_SECONDS="3.5",
        )
    )
    assert s.schema_registry_url == "https://sr.internal:8081/prefix"
    assert s.schema_registry_basic_auth_user_info is not None
    assert s.schema_registry_basic_auth_user_info.reveal() == "u:p:w"
    assert (s.schema_registry_ca_location, s.schema_registry_cert_location) == (ca, cert)
    assert s.schema_registry_key_location == key
    assert s.schema_registry_timeout_seconds == 3.5
    assert load_settings(BASE).schema_registry_timeout_seconds == 10.0


def test_schema_registry_problems(tmp_path: Path) -> None:
    cert = secret_file(tmp_path, "cert.pem", "cert")
    with pytest.raises(ConfigError) as info:
        load_settings(
            env(
                SCHEMA_REGISTRY_URL="https://sr.internal",
                SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO="no-colon",
                SCHEMA_REGISTRY_CA_LOCATION="/nonexistent/ca.pem",
                SCHEMA_REGISTRY_CERT_LOCATION=cert,
                SCHEMA_REGISTRY_TIMEOUT_SECONDS="0",
            )
        )
    assert sorted(p.field for p in problems_of(info.value)) == [
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
        "SCHEMA_REGISTRY_CA_LOCATION",
        "SCHEMA_REGISTRY_KEY_LOCATION",
        "SCHEMA_REGISTRY_TIMEOUT_SECONDS",
    ]
    assert "no-colon" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(env(SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO="u:p"))
    assert [p.field for p in problems_of(info.value)] == ["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"]
    assert "SCHEMA_REGISTRY_URL" in info.value.why


# ---- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "root"),
    [
        ("https://acct.api-us1.com", "https://acct.api-us1.com"),
        ("https://acct.api-us1.com/", "https://acct.api-us1.com"),
        ("https://acct.api-us1.com/api/3", "https://acct.api-us1.com"),
        ("https://acct.api-us1.com/api/3/", "https://acct.api-us1.com"),
        ("https://acct.api-us1.com:8443", "https://acct.api-us1.com:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.9.9.9", "http://127.9.9.9"),
        ("http://localhost:1/api/3", "http://localhost:1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_ac_api_url_accepted(raw: str, root: str) -> None:
    s = load_settings(env(AC_API_URL=raw))
    assert s.ac_api_url == root
    assert s.ac_base_url == root + "/api/3"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("http://acct.api-us1.com", "https://"),
        ("http://10.0.0.1:8080", "https://"),
        ("http://127.0.0.1.evil.com", "https://"),
        ("https://user:pw@acct.api-us1.com", "user name or password"),
        ("https://tok@acct.api-us1.com", "user name or password"),
        ("https://acct.api-us1.com/api/3?x=1", "query"),
        ("https://acct.api-us1.com/?", "query"),
        ("https://acct.api-us1.com#frag", "fragment"),
        ("https://acct.api-us1.com/other", "no other path"),
        ("https://acct.api-us1.com/api/3/lists", "no other path"),
        ("ftp://acct.api-us1.com", "URL like"),
        ("https://", "URL like"),
        ("https://acct.api-us1.com:99999", "port"),
        ("https://acct.api-us1.com/ api/3", "spaces"),
        ("acct.api-us1.com", "URL like"),
    ],
)
def test_ac_api_url_refused(raw: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(AC_API_URL=raw))
    [problem] = problems_of(info.value)
    assert problem.field == "AC_API_URL"
    assert why in problem.why
    assert "pw@" not in problem.why and "tok@" not in problem.why


def test_schema_registry_url_allows_a_path_but_not_credentials() -> None:
    s = load_settings(env(SCHEMA_REGISTRY_URL="https://sr.internal/registry/v1"))
    assert s.schema_registry_url == "https://sr.internal/registry/v1"
    assert (
        load_settings(env(SCHEMA_REGISTRY_URL="http://127.0.0.1:8081")).schema_registry_url
        == "http://127.0.0.1:8081"
    )
    for raw in (
        "https://u:secretpw@sr.internal",
        "http://sr.internal",
        "https://sr.internal/?x=1",
        "https://sr.internal/#x",
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(env(SCHEMA_REGISTRY_URL=raw))
        assert [p.field for p in problems_of(info.value)] == ["SCHEMA_REGISTRY_URL"]
        assert "secretpw" not in str(info.value)


# ---- safe defaults: the sender URL of created lists ------------------------------------------


def test_list_creation_needs_a_real_sender_url() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(AC_LIST_SENDER_URL=None))
    [problem] = problems_of(info.value)
    assert problem.field == "AC_LIST_SENDER_URL"
    assert "AC_CREATE_LISTS=false" in problem.why
    for example in (
        "https://www.example.com",
        "http://example.org/x",
        "https://lists.example.net",
        "https://acme.example",
        "https://WWW.EXAMPLE.COM.",
    ):
        with pytest.raises(ConfigError) as info:
            load_settings(env(AC_LIST_SENDER_URL=example))
        [problem] = problems_of(info.value)
        assert problem.field == "AC_LIST_SENDER_URL"
        assert "example domain" in problem.why


def test_sender_url_needed_only_while_lists_are_created() -> None:
    s = load_settings(env(AC_LIST_SENDER_URL=None, AC_CREATE_LISTS="false"))
    assert s.ac_create_lists is False
    assert s.ac_list_sender_url == ""
    s = load_settings(env(AC_LIST_SENDER_URL="https://www.notexample.com/"))
    assert s.ac_list_sender_url == "https://www.notexample.com"
