import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


def test_the_delay_is_half_the_step_plus_the_jitter_s_share_of_the_other_half() -> None:
    assert backoff_delay(3, 0.5) == pytest.approx(2.0 + 1.0)  # step 4 s: 2 s + 0.5 * 2 s
    assert backoff_delay(0, 0.5, base=2.0) == pytest.approx(1.5)


def test_the_default_cap_is_a_minute() -> None:
    assert backoff_delay(50, 0.0) == pytest.approx(30.0)
    assert backoff_delay(50, 1.0) == pytest.approx(60.0)


def test_the_exponent_stops_at_32_so_any_attempt_count_is_safe() -> None:
    step = 0.5 * 2**32
    assert backoff_delay(32, 0.0, cap=math.inf) == pytest.approx(step / 2)
    assert backoff_delay(10**9, 0.0, cap=math.inf) == pytest.approx(step / 2)


def test_a_negative_attempt_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^attempt must be >= 0$"):
        backoff_delay(-1, 0.5)
    assert backoff_delay(0, 0.0) == pytest.approx(0.25)  # zero is the first attempt


@given(
    st.integers(0, 60), st.floats(0, 1, exclude_max=True), st.floats(0.01, 10), st.floats(0.1, 120)
)
def test_the_delay_is_between_half_the_step_and_the_step(
    attempt: int, jitter: float, base: float, cap: float
) -> None:
    step = min(cap, base * 2**attempt)
    assert step / 2 - 1e-9 <= backoff_delay(attempt, jitter, base=base, cap=cap) <= step + 1e-9
