"""JSON lines, librdkafka's records restructured, and the repeat throttle (pure: takes ``now``)."""

from __future__ import annotations

import itertools
import json
import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from service.app.logs import (
    JsonFormatter,
    RepeatFilter,
    RepeatThrottle,
    kafka_logger,
)


def test_first_line_passes_then_one_per_interval_with_the_count() -> None:
    throttle = RepeatThrottle(interval=10.0)
    assert throttle.admit("k", 100.0) == 0
    assert [throttle.admit("k", 100.0 + i) for i in range(1, 10)] == [None] * 9
    assert throttle.admit("k", 110.0) == 9  # nine left out since the last written line
    assert throttle.admit("k", 110.5) is None
    assert throttle.admit("k", 125.0) == 1
    assert throttle.admit("k", 140.0) == 0  # nothing left out: a plain line again


def test_keys_are_independent() -> None:
    throttle = RepeatThrottle(interval=10.0)
    assert throttle.admit("a", 0.0) == 0
    assert throttle.admit("b", 0.5) == 0
    assert throttle.admit("a", 1.0) is None
    assert throttle.admit("b", 10.4) is None
    assert throttle.admit("a", 10.0) == 1


def test_memory_is_bounded_and_the_oldest_key_is_forgotten() -> None:
    throttle = RepeatThrottle(interval=10.0, max_keys=3)
    for i, key in enumerate("abc"):
        assert throttle.admit(key, float(i)) == 0
    assert throttle.admit("d", 3.0) == 0
    assert len(throttle) == 3
    assert throttle.admit("a", 4.0) == 0  # forgotten, so written as a first line
    assert throttle.admit("c", 4.0) is None  # still remembered


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=300))
def test_at_most_one_line_per_interval_and_every_line_counted(offsets: list[float]) -> None:
    times = sorted(offsets)
    throttle = RepeatThrottle(interval=10.0)
    written: list[float] = []
    counted = 0
    for now in times:
        left_out = throttle.admit("k", now)
        if left_out is not None:
            written.append(now)
            counted += 1 + left_out
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(written))
    if times:
        assert written[0] == times[0]
        # every line is written, or counted in a later written one, except the ones after
        # the last written line (their count waits for the next line of the kind)
        after_last = sum(1 for t in times if t >= written[-1]) - 1
        assert counted + after_last == len(times)


def record(
    name: str = "service",
    level: int = logging.WARNING,
    msg: str = "kafka error",
    created: float = 0.0,
    **extra: object,
) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    rec.created = created
    rec.__dict__.update(extra)
    return rec


def test_filter_throttles_warnings_by_shape_with_digits_masked() -> None:
    f = RepeatFilter(interval=10.0)
    refused = "127.0.0.1:{}/bootstrap: Connect failed (after {}ms in state CONNECT)"
    first = record(error=refused.format(9092, 0), created=0.0)
    assert f.filter(first) and not hasattr(first, "repeated")
    assert not f.filter(record(error=refused.format(9092, 3), created=1.0))
    assert not f.filter(record(error=refused.format(9093, 12), created=2.0))
    other = record(error="1/1 brokers are down", created=2.0)
    assert f.filter(other)  # another error: its own first line
    again = record(error=refused.format(9092, 1), created=10.0)
    assert f.filter(again) and again.repeated == 2  # type: ignore[attr-defined]
    assert f.filter(record(level=logging.INFO, msg="ledger restored", created=10.1))
    assert f.filter(record(level=logging.INFO, msg="ledger restored", created=10.2))


def test_json_formatter_writes_one_object_per_line_with_the_traceback() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    rec = logging.LogRecord("service", logging.CRITICAL, __file__, 1, "uncaught", None, exc_info)
    rec.repeated = 3
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "uncaught" and data["level"] == "CRITICAL" and data["repeated"] == 3
    assert "ValueError: boom" in data["exc"] and "Traceback" in data["exc"]


def test_json_formatter_survives_bad_arguments() -> None:
    rec = logging.LogRecord("service", logging.INFO, __file__, 1, "%d items", ("x",), None)
    assert json.loads(JsonFormatter().format(rec))["msg"].startswith("%d items")


def test_librdkafka_records_become_structured() -> None:
    log = kafka_logger()
    rec = log.makeRecord(
        log.name,
        logging.ERROR,
        __file__,
        1,
        "%s [%s] %s",
        (
            "FAIL",
            "rdkafka#consumer-1",
            "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect failed",
        ),
        None,
    )
    assert log.filter(rec)
    data = json.loads(JsonFormatter().format(rec))
    assert data["logger"] == "librdkafka"
    assert data["msg"] == "127.0.0.1:1/bootstrap: Connect failed"
    assert data["facility"] == "FAIL"
    assert data["client"] == "rdkafka#consumer-1"
    assert data["kafka_thread"] == "127.0.0.1:1/bootstrap"


def test_uncaught_exceptions_and_warnings_are_json_lines() -> None:
    """In a child process: a warning, a crash in a thread, then one in the main thread."""
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import threading, warnings
        from service.app.logs import configure_logging
        configure_logging("INFO")
        warnings.warn("careful")
        def crash():
            raise RuntimeError("in a thread")
        t = threading.Thread(target=crash, name="worker-1")
        t.start(); t.join()
        raise KeyError("in main")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert len(records) == 3
    warning, thread, main = records
    assert warning["logger"] == "py.warnings" and "careful" in warning["msg"]
    assert thread["msg"] == "uncaught exception in a thread"
    assert thread["thread_name"] == "worker-1"
    assert "RuntimeError: in a thread" in thread["exc"]
    assert main["msg"] == "uncaught exception" and main["level"] == "CRITICAL"
    assert "KeyError: 'in main'" in main["exc"]
