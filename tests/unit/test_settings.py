from pathlib import Path

import pytest

from service.app.settings import ListTarget, load_settings
from service.core.errors import ConfigError

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
    "KAFKA_TOPIC": "audiences",
    "AC_API_URL": "https://acct.api-us1.com",
    "AC_API_TOKEN": "s3cret-token-value",
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
        env(KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL", KAFKA_PROPERTY_SESSION_TIMEOUT_MS="6000")
    )
    cfg = s.consumer_config()
    assert cfg["security.protocol"] == "SASL_SSL"
    assert cfg["session.timeout.ms"] == "6000"
    assert cfg["enable.auto.commit"] == "false"
    assert cfg["partition.assignment.strategy"] == "cooperative-sticky"
    assert s.producer_config()["security.protocol"] == "SASL_SSL"
    assert "session.timeout.ms" not in s.producer_config()


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
