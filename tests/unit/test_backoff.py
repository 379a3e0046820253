import pytest

from service.core.backoff import backoff_delay


def test_grows_exponentially_and_caps() -> None:
    assert backoff_delay(0, 0.0) == pytest.approx(0.25)
    assert backoff_delay(0, 0.999) < 0.5
    assert backoff_delay(3, 0.0) == pytest.approx(2.0)
    assert backoff_delay(50, 0.999, cap=60) <= 60
    assert backoff_delay(50, 0.0, cap=60) == pytest.approx(30)


def test_jitter_spreads() -> None:
    assert backoff_delay(4, 0.1) != backoff_delay(4, 0.9)


def test_negative_attempt_refused() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.5)
