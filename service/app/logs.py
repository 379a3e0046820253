"""JSON-lines logging, the repeat throttle and the keyed email hash. Configured once, in the
composition root (``cli_run.cmd_run``).

Every line the service writes to stderr is one JSON object:

- the service's own lines (``logging`` with ``extra`` fields);
- librdkafka's lines: every client config built by ``Settings`` carries ``"logger":
  kafka_logger()``, so confluent-kafka hands librdkafka's log lines to Python logging (on the
  client's ``poll``/``consume``) instead of printing text; they arrive as logger ``librdkafka``
  with ``facility`` and ``client`` fields;
- uncaught exceptions (main thread, other threads, unraisable ones in destructors) and Python
  warnings: one line each, the traceback in the ``exc`` field.

The one exception is a fatal crash in native code: ``faulthandler`` then writes the Python stacks
as plain text (nothing else can run at that point).

**Repeats are throttled** (``RepeatFilter``): a warning or error whose shape (logger, level,
message and ``error`` field with the digits masked) was already written within the last
``REPEAT_INTERVAL_SECONDS`` is counted instead of written; the next line of that shape written
after the interval carries ``"repeated": N``, the number of identical lines left out since the
previous one. A broker outage thus writes a few lines per interval, not hundreds.

Emails appear in logs only as ``email_hash``: HMAC-SHA256 under ``EMAIL_HASH_KEY`` (a random key
per process when unset, so hashes then only correlate within one run).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Hashable
from types import TracebackType
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

REPEAT_INTERVAL_SECONDS = 10.0
REPEAT_MAX_KEYS = 1000
KAFKA_LOGGER = "librdkafka"

logger = logging.getLogger("service")


class EmailHasher:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def __call__(self, email: str) -> str:
        return hmac.new(self._key, email.encode(), hashlib.sha256).hexdigest()[:16]


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra`` fields become keys; never raises."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not cost the line
            message = f"{record.msg!s} (unformattable arguments)"
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class RepeatThrottle:
    """Which repeats of a line to write. Pure: ``now`` is given (a record's creation time).

    ``admit(key, now)`` returns ``None`` to leave the line out, or the number of lines of that
    key left out since the last one written (0 for a first line). Invariants: the first line of
    a key is always written; after a written line, no other line of its key is written until
    ``interval`` has passed; every line left out is counted in the next written one. At most
    ``max_keys`` keys are remembered (the oldest are forgotten first; a forgotten key's pending
    count is lost, never its next line).
    """

    def __init__(
        self, interval: float = REPEAT_INTERVAL_SECONDS, max_keys: int = REPEAT_MAX_KEYS
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        # key -> [time of the last written line, lines left out since]
        self._seen: dict[Hashable, list[float]] = {}

    def admit(self, key: Hashable, now: float) -> int | None:
        state = self._seen.get(key)
        if state is None:
            if len(self._seen) >= self.max_keys:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = [now, 0]
            return 0
        written_at, left_out = state
        if now < written_at + self.interval:
            state[1] = left_out + 1
            return None
        # Written again: move the key to the end, so the oldest keys are forgotten first.
        del self._seen[key]
        self._seen[key] = [now, 0]
        return int(left_out)

    def __len__(self) -> int:
        return len(self._seen)


_DIGITS = re.compile(r"\d+")


def _shape(record: logging.LogRecord) -> Hashable:
    """What makes two records "the same line": logger, level, message and error, digits masked
    (timings, counts, ports and offsets vary between otherwise identical lines)."""
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    error = record.__dict__.get("error")
    return (
        record.name,
        record.levelno,
        _DIGITS.sub("#", message),
        _DIGITS.sub("#", str(error)) if error is not None else None,
    )


class RepeatFilter(logging.Filter):
    """A handler filter applying ``RepeatThrottle`` to warnings and errors (see the module
    docstring). Lower levels pass untouched."""

    def __init__(
        self, interval: float = REPEAT_INTERVAL_SECONDS, min_level: int = logging.WARNING
    ) -> None:
        super().__init__()
        self.throttle = RepeatThrottle(interval)
        self.min_level = min_level
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = _shape(record)
        with self._lock:
            left_out = self.throttle.admit(key, record.created)
        if left_out is None:
            return False
        if left_out:
            record.repeated = left_out
        return True


# librdkafka's level (syslog) is already mapped to Python's by confluent-kafka; its call is
# ``logger.log(level, "%s [%s] %s", facility, client_name, text)``.
_KAFKA_FORMAT = "%s [%s] %s"
_KAFKA_THREAD = re.compile(r"\[thrd:([^\]]*)\]: ", re.S)


class _KafkaRecordFilter(logging.Filter):
    """Turns confluent-kafka's positional log call into a structured record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg == _KAFKA_FORMAT and isinstance(args, tuple) and len(args) == 3:
            facility, client, text = (str(a) for a in args)
            match = _KAFKA_THREAD.match(text)
            if match:
                record.kafka_thread = match.group(1)
                text = text[match.end() :]
            record.msg = text
            record.args = ()
            record.facility = facility
            record.client = client
        return True


def kafka_logger() -> logging.Logger:
    """The logger to pass as the ``logger`` property of every Consumer, Producer and
    AdminClient: librdkafka's lines then become JSON lines of logger ``librdkafka``."""
    log = logging.getLogger(KAFKA_LOGGER)
    if not any(isinstance(f, _KafkaRecordFilter) for f in log.filters):
        log.addFilter(_KafkaRecordFilter())
    return log


def quiet_kafka_logger() -> logging.Logger:
    """A logger that drops everything: for short-lived clients whose librdkafka chatter is not
    wanted (configuration validation, the CLI's one-line answers)."""
    log = logging.getLogger(f"{KAFKA_LOGGER}.quiet")
    log.propagate = False
    log.setLevel(logging.CRITICAL + 1)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


def _log_uncaught(
    exc_type: type[BaseException],
    exc: BaseException | None,
    tb: TracebackType | None,
    message: str,
    **fields: Any,
) -> None:
    logger.critical(message, exc_info=(exc_type, exc, tb), extra=fields)  # type: ignore[arg-type]


def install_exception_hooks() -> None:
    """Uncaught exceptions (any thread, or raised in a destructor) become one JSON line with
    the traceback in ``exc``; Python warnings go through logging too."""

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        _log_uncaught(exc_type, exc, tb, "uncaught exception")

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else None
        _log_uncaught(
            args.exc_type,
            args.exc_value,
            args.exc_traceback,
            "uncaught exception in a thread",
            thread_name=name,
        )

    def unraisablehook(unraisable: Any) -> None:
        _log_uncaught(
            unraisable.exc_type,
            unraisable.exc_value,
            unraisable.exc_traceback,
            "exception ignored",
            where=repr(unraisable.object)[:200],
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    logging.captureWarnings(True)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr, repeats throttled, exception hooks installed. May be called again
    (``run`` calls it first at INFO, then with ``LOG_LEVEL`` once settings are read)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A failing handler must not print its own plain-text traceback on stderr.
    logging.raiseExceptions = False
    # httpx logs every request URL at INFO; URLs carry emails in query strings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    kafka_logger()
    install_exception_hooks()
