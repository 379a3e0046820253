"""Settings of the operator tools of issue 17: the dead-letter breaker and the preview."""

from __future__ import annotations

import pytest

from service.app.settings_loader import load_settings
from service.core.errors import ConfigError

BASE = {
    "KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
    "KAFKA_TOPIC": "audiences",
    "AC_API_URL": "https://acct.api-us1.com",
    "AC_API_TOKEN": "s3cret-token-value",
    "AC_LIST_SENDER_URL": "https://www.acme-corp.test",
}


def test_the_breaker_is_on_and_generous_by_default() -> None:
    s = load_settings(BASE)
    assert (s.dlq_breaker_window, s.dlq_breaker_max_share) == (1000, 0.5)
    s = load_settings({**BASE, "DLQ_BREAKER_WINDOW": "200", "DLQ_BREAKER_MAX_SHARE": "1"})
    assert (s.dlq_breaker_window, s.dlq_breaker_max_share) == (200, 1.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DLQ_BREAKER_WINDOW", "5"),
        ("DLQ_BREAKER_WINDOW", "many"),
        ("DLQ_BREAKER_MAX_SHARE", "-0.5"),
        ("DLQ_BREAKER_MAX_SHARE", "1.5"),
        ("DLQ_BREAKER_MAX_SHARE", "half"),
    ],
)
def test_breaker_nonsense_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, name: value})
    assert info.value.field == name
    assert value not in info.value.why


def test_the_preview_has_a_group_of_its_own() -> None:
    s = load_settings(BASE)
    assert (s.dry_run, s.preview_group_id) == (False, "ac-audience-sync.preview")
    s = load_settings({**BASE, "KAFKA_GROUP_ID": "live", "AC_DRY_RUN": "true"})
    assert (s.dry_run, s.preview_group_id) == (True, "live.preview")
    s = load_settings({**BASE, "KAFKA_PREVIEW_GROUP_ID": "look"})
    assert s.preview_group_id == "look"


def test_the_preview_group_is_never_the_live_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "KAFKA_GROUP_ID": "g", "KAFKA_PREVIEW_GROUP_ID": "g"})
    assert info.value.field == "KAFKA_PREVIEW_GROUP_ID"


def test_preview_settings_consume_as_the_preview_group_and_take_no_share() -> None:
    from service.app.preview import preview_settings

    s = preview_settings(load_settings({**BASE, "KAFKA_GROUP_ID": "live"}))
    assert s.kafka_group_id == "live.preview"
    assert s.consumer_config()["group.id"] == "live.preview"
    assert s.ac_rate_share == "none" and s.dry_run
