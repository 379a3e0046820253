"""``ac-audience-sync check``: one verdict per item; and ``validate_kafka_clients``, the check of
the librdkafka properties that every command runs before anything else.

Exit statuses (defined in ``cli_common.py``, shared by ``check``, ``explain`` and ``reconcile``;
README "Commands"):

====  ==========================================================================
0     every check passed
1     a check failed (topic missing, ledger size, schema registry answer, ...)
2     configuration error (environment variable, librdkafka property, or the broker refused
      the SASL credentials)
3     the Kafka broker is unreachable
4     ActiveCampaign is unreachable (connection error, timeout, 5xx)
5     ActiveCampaign refused the token (or the account)
====  ==========================================================================

When several fail, the most basic wins: 2, then 3, 4, 5, 1.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from service.adapters.ac_http import AcTool
from service.app.cli_common import (
    EXIT_AC_REFUSED,
    EXIT_AC_UNREACHABLE,
    EXIT_BROKER_UNREACHABLE,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
)
from service.app.logs import quiet_kafka_logger
from service.app.settings import Settings
from service.core import acapi
from service.core.errors import (
    AccountBlocked,
    ApiError,
    ConfigError,
    TransientApiError,
)

_PRECEDENCE = (EXIT_CONFIG, EXIT_BROKER_UNREACHABLE, EXIT_AC_UNREACHABLE, EXIT_AC_REFUSED)


def worst(codes: list[int]) -> int:
    """The exit status for several outcomes: the most basic failure (see the table above)."""
    for code in _PRECEDENCE:
        if code in codes:
            return code
    return EXIT_FAILED if any(codes) else EXIT_OK


# ---- librdkafka properties -----------------------------------------------------------------

_PROPERTY_NAME = re.compile(r"[a-z][a-z0-9]*(?:\.[a-z0-9]+)+")


_CREATE_FAILED = re.compile(r"^Failed to create (consumer|producer): ")


def _build_error(factory: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> str | None:
    """librdkafka's complaint about ``config`` (None when a client builds). Nothing connects
    for long: a consumer is closed at once, a producer dropped."""
    config = {**config, "logger": quiet_kafka_logger()}
    try:
        client = factory(config)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        return str(error.str() if hasattr(error, "str") else error)
    except (TypeError, ValueError) as exc:
        return str(exc)
    if isinstance(client, Consumer):
        client.close()
    return None


def _variable(settings: Settings, prop: str) -> str:
    suffix = prop.upper().replace(".", "_")
    return f"KAFKA_PROPERTY_{suffix}" + ("_FILE" if prop in settings.kafka_secrets else "")


def validate_kafka_clients(settings: Settings) -> list[ConfigError]:
    """Every problem librdkafka finds in the configured properties (``session.timeout.ms=abc``,
    an unknown property, SASL without credentials, an unreadable CA file...), secret values
    redacted. Builds a consumer and a producer as the service will; only when one fails, each
    property is set alone, so that every property librdkafka refuses by itself is named (one
    problem each). A problem between properties (found only when the client is created) is
    reported as librdkafka words it, under the first property it names."""
    consumer = _build_error(Consumer, settings.consumer_config())
    producer = _build_error(Producer, settings.producer_config())
    if consumer is None and producer is None:
        return []
    user = settings.kafka_user_properties()
    problems: list[ConfigError] = []
    base = {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "validate"}
    for prop, value in sorted(user.items()):
        alone = _build_error(Consumer, {**base, prop: value})
        if alone is not None and not _CREATE_FAILED.match(alone):
            problems.append(
                ConfigError(_variable(settings, prop), settings.redact(f"librdkafka: {alone}"))
            )
    if problems:
        return problems
    message = _CREATE_FAILED.sub("", consumer or producer or "")
    named = [p for p in _PROPERTY_NAME.findall(message) if p in user]
    field = _variable(settings, named[0]) if named else "KAFKA_PROPERTY_*"
    return [ConfigError(field, settings.redact(f"librdkafka: {message}"))]


# ---- the checks ----------------------------------------------------------------------------


def _line(ok: bool, item: str, detail: str = "") -> bool:
    print(f"{'OK  ' if ok else 'FAIL'}  {item}{': ' + detail if detail else ''}", flush=True)
    return ok


class BrokerUnreachable(Exception):
    """The Kafka broker did not answer within the timeout."""


class BrokerRefusedCredentials(Exception):
    """The broker answered but refused the SASL credentials."""


def list_topics(settings: Settings, timeout: float) -> Any:
    """The cluster's metadata (all topics: asking for one by name lets a broker auto-create
    it), or ``BrokerUnreachable`` / ``BrokerRefusedCredentials`` (messages redacted)."""
    errors: list[Any] = []
    config: dict[str, Any] = {
        **settings.producer_config(),
        "logger": quiet_kafka_logger(),
        "error_cb": errors.append,
    }
    admin = AdminClient(config)
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(0.2)  # serves error_cb: was it the credentials?
        refused = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
        if refused:
            raise BrokerRefusedCredentials(settings.redact(refused[0].str())) from None
        error = exc.args[0] if exc.args else exc
        raise BrokerUnreachable(settings.redact(str(error))) from None


REFUSED_HINT = (
    "check KAFKA_PROPERTY_SASL_USERNAME and KAFKA_PROPERTY_SASL_PASSWORD (or their _FILE)"
)


def check_kafka(settings: Settings, timeout: float) -> list[int]:
    try:
        metadata = list_topics(settings, timeout)
    except BrokerRefusedCredentials as exc:
        _line(False, "broker", f"refused the credentials ({exc}): {REFUSED_HINT}")
        return [EXIT_CONFIG]
    except BrokerUnreachable as exc:
        _line(False, "broker", f"{settings.kafka_bootstrap_servers} did not answer ({exc})")
        return [EXIT_BROKER_UNREACHABLE]
    results = [_line(True, "broker", f"{len(metadata.brokers)} broker(s) answered")]
    topic = metadata.topics.get(settings.kafka_topic)
    if topic is None or topic.error is not None:
        results.append(_line(False, "topic", f"{settings.kafka_topic} does not exist"))
    else:
        results.append(
            _line(True, "topic", f"{settings.kafka_topic} has {len(topic.partitions)} partition(s)")
        )
    dlq = metadata.topics.get(settings.kafka_dlq_topic)
    if dlq is None:
        _line(True, "dead-letter topic", f"{settings.kafka_dlq_topic} missing; `run` creates it")
    else:
        _line(True, "dead-letter topic", f"{settings.kafka_dlq_topic} exists")
    ledger = metadata.topics.get(settings.kafka_ledger_topic)
    name = settings.kafka_ledger_topic
    if ledger is None:
        _line(True, "ledger topic", f"{name} missing; `run` creates it (compacted)")
    elif topic is not None and len(ledger.partitions) != len(topic.partitions):
        results.append(
            _line(
                False,
                "ledger topic",
                f"{name} has {len(ledger.partitions)} partition(s), the source topic "
                f"{len(topic.partitions)}: they must be equal",
            )
        )
    else:
        _line(True, "ledger topic", f"{name} exists")
    return [EXIT_OK if ok else EXIT_FAILED for ok in results]


def ac_exit_code(exc: ApiError) -> int:
    """Unreachable (no answer, or a server error) or refused; anything else is a failure."""
    if isinstance(exc, AccountBlocked):
        return EXIT_AC_REFUSED
    if isinstance(exc, TransientApiError) and (exc.status is None or exc.status >= 500):
        return EXIT_AC_UNREACHABLE
    return EXIT_FAILED


def check_token(settings: Settings, timeout: float) -> int:
    item = "ActiveCampaign token"
    try:
        token = settings.current_token()
    except ConfigError as exc:
        _line(False, item, f"{exc.field}: {exc.why}")
        return EXIT_CONFIG
    # The tools' ticks of the account budget: a check shares the 5/s with a running service.
    tool = AcTool(
        settings.ac_base_url,
        token.reveal,
        rate=settings.ac_rate_limit_per_second,
        guard=settings.ac_rate_guard_seconds,
        tools_every=settings.ac_tools_tick_every,
        timeout=timeout,
    )
    try:
        tool.call(acapi.request(acapi.ApiCall("GET", "/lists", "lists", (("limit", "1"),))))
    except AccountBlocked as exc:
        _line(False, item, f"refused by {settings.ac_api_url} (HTTP {exc.status})")
        return EXIT_AC_REFUSED
    except ApiError as exc:
        code = ac_exit_code(exc)
        what = "unreachable" if code == EXIT_AC_UNREACHABLE else "answered"
        _line(False, item, settings.redact(f"{settings.ac_api_url} {what}: {exc}"))
        return code
    finally:
        tool.close()
    _line(True, item, f"accepted by {settings.ac_api_url}")
    return EXIT_OK


def registry_client(settings: Settings, timeout: float) -> httpx.Client:
    """An httpx client with the schema registry's TLS settings and credentials."""
    context = ssl.create_default_context(cafile=settings.schema_registry_ca_location)
    if settings.schema_registry_cert_location and settings.schema_registry_key_location:
        context.load_cert_chain(
            settings.schema_registry_cert_location, settings.schema_registry_key_location
        )
    auth = None
    if settings.schema_registry_basic_auth_user_info is not None:
        user, _, password = settings.schema_registry_basic_auth_user_info.reveal().partition(":")
        auth = httpx.BasicAuth(user, password)
    return httpx.Client(verify=context, auth=auth, timeout=timeout)


def check_registry(settings: Settings, timeout: float) -> int:
    """``GET /subjects`` with the configured credentials (when a registry is configured)."""
    url = settings.schema_registry_url
    if url is None:
        return EXIT_OK
    item = "schema registry"
    try:
        with registry_client(settings, timeout) as http:
            response = http.get(f"{url}/subjects")
    except (OSError, ssl.SSLError) as exc:
        _line(False, item, settings.redact(f"TLS files not usable: {exc}"))
        return EXIT_CONFIG
    except httpx.HTTPError as exc:
        _line(False, item, f"{url} unreachable ({type(exc).__name__})")
        return EXIT_FAILED
    if response.status_code in (401, 403):
        _line(False, item, f"{url} refused the credentials (HTTP {response.status_code})")
        return EXIT_FAILED
    if response.status_code != 200:
        _line(False, item, f"{url} answered HTTP {response.status_code}")
        return EXIT_FAILED
    _line(True, item, f"{url} answered")
    return EXIT_OK


def run_checks(settings: Settings, *, timeout: float) -> int:
    codes = check_kafka(settings, timeout)
    codes.append(check_registry(settings, timeout))
    codes.append(check_token(settings, timeout))
    return worst(codes)
