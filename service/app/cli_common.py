"""What the commands of ``ac-audience-sync`` share: their exit statuses (README "Commands"),
the settings a command runs with, the broker's problems as one line on stderr, and retries of
ActiveCampaign's transient failures.

Invariants:
- a command fails with one clear line on stderr and an exit status, never a traceback, when
  the configuration, a broker or AC cannot be used: configuration (and bad usage) 2, broker
  unreachable 3, AC unreachable 4, AC refused 5; ``run`` uses only 0, 1 and 2;
- every configuration problem is reported, one line each, before anything is read (the
  environment first, then the librdkafka properties, by building the clients as ``run`` will).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from service.app.settings import Settings, problems_of
from service.app.settings_loader import load_settings
from service.core.errors import ConfigError

T = TypeVar("T")

# Exit statuses of every command (README "Commands"); ``run`` uses 0, 1 and 2.
EXIT_OK = 0

EXIT_FAILED = 1  # check: a check failed; explain: no entry; reconcile: the list differs

EXIT_CONFIG = 2  # configuration (environment, librdkafka property, SASL refused), bad usage

EXIT_BROKER_UNREACHABLE = 3

EXIT_AC_UNREACHABLE = 4  # no answer, a timeout or a 5xx

EXIT_AC_REFUSED = 5  # the token (or the account) refused, or the request rejected


def _load(env: Mapping[str, str]) -> Settings | list[ConfigError]:
    """Settings, or every configuration problem: the environment first, then the librdkafka
    properties (by building the clients, as ``run`` will)."""
    from service.app.check import validate_kafka_clients

    try:
        settings = load_settings(env)
    except ConfigError as exc:
        return list(problems_of(exc))
    return validate_kafka_clients(settings) or settings


def _settings_or_exit(env: Mapping[str, str]) -> Settings:
    """For the CLI commands: on any problem, one line each on stderr and exit status 2."""
    loaded = _load(env)
    if isinstance(loaded, list):
        for problem in loaded:
            print(
                f"ac-audience-sync: configuration error: {problem.field}: {problem.why}",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_CONFIG)
    return loaded


def _quiet(config: Mapping[str, Any]) -> dict[str, Any]:
    """A client config whose librdkafka log lines are dropped: a CLI command answers in one
    line, not with librdkafka's connection attempts."""
    from service.app.logs import quiet_kafka_logger

    return {**config, "logger": quiet_kafka_logger()}


def ledger_partitions(settings: Settings, timeout: float) -> list[int]:
    from service.app.check import list_topics

    metadata = list_topics(settings, timeout)
    topic = metadata.topics.get(settings.kafka_ledger_topic)
    if topic is None or topic.error is not None or not topic.partitions:
        raise ConfigError(
            "KAFKA_LEDGER_TOPIC", f"{settings.kafka_ledger_topic} does not exist (has `run` run?)"
        )
    return sorted(topic.partitions)


def _broker_refused(command: str, detail: str) -> int:
    from service.app.check import REFUSED_HINT

    print(
        f"ac-audience-sync {command}: the Kafka broker refused the credentials ({detail}): "
        f"{REFUSED_HINT}",
        file=sys.stderr,
    )
    return EXIT_CONFIG


def _broker_unreachable(command: str, settings: Settings, detail: str) -> int:
    print(
        f"ac-audience-sync {command}: the Kafka broker is unreachable "
        f"({settings.kafka_bootstrap_servers}: {detail})",
        file=sys.stderr,
    )
    return EXIT_BROKER_UNREACHABLE


def _kafka_errors(command: str, settings: Settings, work: Callable[[], int]) -> int:
    """``work()``, with the broker's and the topics' problems as one line and an exit status."""
    from confluent_kafka import KafkaException

    from service.app.check import BrokerRefusedCredentials, BrokerUnreachable

    try:
        return work()
    except BrokerUnreachable as exc:
        return _broker_unreachable(command, settings, str(exc))
    except BrokerRefusedCredentials as exc:
        return _broker_refused(command, str(exc))
    except KafkaException as exc:
        return _broker_unreachable(command, settings, settings.redact(str(exc)))
    except (ConfigError, LookupError) as exc:
        why = f"{exc.field}: {exc.why}" if isinstance(exc, ConfigError) else str(exc)
        print(f"ac-audience-sync {command}: {why}", file=sys.stderr)
        return EXIT_CONFIG


def kafka_only_env(env: Mapping[str, str]) -> dict[str, str]:
    """``explain`` reads only Kafka: stand-ins for the AC settings it never uses."""
    merged = dict(env)
    merged.setdefault("AC_API_URL", "https://unused.invalid")
    if not merged.get("AC_API_TOKEN") and not merged.get("AC_API_TOKEN_FILE"):
        merged["AC_API_TOKEN"] = "unused"  # noqa: S105 - a stand-in, never sent
    merged["AC_CREATE_LISTS"] = "false"  # explain creates nothing: no sender URL needed
    return merged


RECONCILE_ATTEMPTS = 4


def _retrying(call: Callable[[], T], what: str, command: str = "reconcile") -> T:
    """``call`` again after a transient AC failure (a few times, with back-off): one 5xx must
    not end a reconcile that has read thousands of members."""
    from service.core.errors import RateLimited, TransientApiError

    for attempt in range(RECONCILE_ATTEMPTS):
        try:
            return call()
        except (TransientApiError, RateLimited) as exc:
            if attempt == RECONCILE_ATTEMPTS - 1:
                raise
            wait = min(30.0, exc.retry_after if isinstance(exc, RateLimited) else 2.0**attempt)
            print(
                f"ac-audience-sync {command}: {what}: ActiveCampaign answered {exc}; "
                f"retrying in {wait:g}s",
                file=sys.stderr,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
