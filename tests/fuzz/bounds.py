"""What the fuzz properties share: the settings profiles and the decode contract's bounds.

Profiles (``ACSYNC_FUZZ_PROFILE``): ``ci`` (the default) runs each property with the examples it
names, derandomized (the same examples on every run, so CI is reproducible); ``long`` (``make
fuzz``) runs ``ACSYNC_FUZZ_FACTOR`` (default 50) times as many, from a random seed (a failure
prints the ``@seed`` to reproduce it). Profiles are applied per test (``fuzz(n)``), never
loaded globally, so the other suites' Hypothesis settings are untouched.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from service.core.codec import REASONS
from service.core.errors import PoisonMessage, SchemaUnavailable
from service.core.model import (
    MAX_ATTRIBUTES,
    OCCURRED_AT_MAX_MS,
    OCCURRED_AT_MIN_MS,
    MembershipEvent,
    is_valid_email,
    normalise_email,
)

PROFILE = os.environ.get("ACSYNC_FUZZ_PROFILE", "ci")
FACTOR = int(os.environ.get("ACSYNC_FUZZ_FACTOR", "50")) if PROFILE == "long" else 1
_COMMON: dict[str, Any] = {
    "deadline": None,  # the bound below is checked per record, on what matters
    "database": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)

# The contract's bounds, with slack: "a few ms" per record is 20 ms here so a loaded two-core CI
# machine does not fail it (the hostile inputs this guards against took seconds to hours), and
# memory is a small multiple of the record plus a constant (a full attributes map, one email).
TIME_BOUND_SECONDS = 0.020
MEMORY_FACTOR = 4
MEMORY_CONSTANT = 96 * 1024


def fuzz(examples: int) -> settings:
    """The settings of a property run ``examples`` times in CI."""
    return settings(settings.get_profile(PROFILE), max_examples=examples * FACTOR)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``call`` returned or raised, seconds it took), with the automatic garbage collector
    off, as the service runs (service/app/runtime.py): a collection pause is not the record's."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        began = time.perf_counter()
        try:
            result: Any = call()
        except (PoisonMessage, SchemaUnavailable) as failure:
            result = failure
        return result, time.perf_counter() - began
    finally:
        if enabled:
            gc.enable()


def peak_memory(call: Callable[[], Any]) -> int:
    """Bytes ``call`` allocated at its peak above what was allocated before it (tracemalloc)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with contextlib.suppress(PoisonMessage, SchemaUnavailable):
            call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def outcome(item: Any) -> Any:
    if isinstance(item, PoisonMessage):
        return ("poison", item.reason)
    if isinstance(item, SchemaUnavailable):
        return ("unavailable", item.schema_id)
    return item


def assert_contract(result: Any, seconds: float, size: int, memory: int) -> None:
    """An answer of the decode contract: a valid event or a refusal with an enumerated reason,
    in bounded time and memory."""
    assert seconds < TIME_BOUND_SECONDS, f"{seconds * 1000:.1f} ms for a {size}-byte record"
    assert memory < MEMORY_FACTOR * size + MEMORY_CONSTANT, f"{memory} bytes for {size}"
    if isinstance(result, PoisonMessage):
        assert result.reason in REASONS, result
        return
    assert isinstance(result, MembershipEvent), repr(result)[:300]
    assert is_valid_email(result.email) and normalise_email(result.email) == result.email
    assert OCCURRED_AT_MIN_MS <= result.occurred_at_ms <= OCCURRED_AT_MAX_MS
    assert result.event_id.strip() and result.audience_id and result.audience_name
    assert result.audience_id == result.audience_id.strip()
    assert len(result.attributes) <= MAX_ATTRIBUTES
