"""Settings of the operator tools of issue 17: the dead-letter breaker and the preview."""

from __future__ import annotations

import pytest

from service.app.settings import load_settings
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
