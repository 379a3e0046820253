"""Configuration from the environment: validated once at start-up into a frozen ``Settings``.

Invariants:
- every problem is reported as ``ConfigError(field, why)`` naming the environment variable;
- the API token is held in a ``Secret`` whose ``str``/``repr`` never reveal it;
- the librdkafka dict built here always has ``enable.auto.commit=false``: offsets are committed
  by the runner only after the changes they carry are done.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from service.core.errors import ConfigError
from service.core.lists import ListTarget

LIST_TEMPLATE_FIELDS = frozenset({"audience_id", "audience_name", "campaign_id", "treatment_group"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Event attribute -> contact/sync field. Anything else must be mapped to a custom field id.
DEFAULT_ATTRIBUTE_MAP: Mapping[str, str] = {
    "first_name": "firstName",
    "last_name": "lastName",
    "phone": "phone",
}
# librdkafka properties the service owns: a user override would break commit-after-success.
_FORCED_KAFKA = {"enable.auto.commit": "false", "enable.auto.offset.store": "false"}


class Secret:
    """A string that is never printed. ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str
    kafka_topic: str
    kafka_group_id: str = "ac-audience-sync"
    kafka_dlq_topic: str = ""
    kafka_ledger_topic: str = ""
    kafka_properties: Mapping[str, str] = field(default_factory=dict)
    schema_registry_url: str | None = None
    ac_api_url: str = ""
    ac_api_token: Secret = field(default_factory=lambda: Secret(""))
    ac_api_token_file: Path | None = None
    ac_rate_limit_per_second: float = 5.0
    ac_concurrency: int = 8
    ac_request_timeout_seconds: float = 10.0
    ac_create_lists: bool = True
    ac_list_sender_url: str = "https://www.example.com"
    ac_list_sender_reminder: str = "You are receiving this because you joined one of our audiences."
    list_name_template: str = "{audience_name}"
    list_mapping: Mapping[str, ListTarget] = field(default_factory=dict)
    attribute_map: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ATTRIBUTE_MAP))
    field_map: Mapping[str, str] = field(default_factory=dict)
    coalesce_window_seconds: float = 5.0
    # Once a partition is caught up, a change's window counts from its first record's publication
    # (the record timestamp) when that is sooner than from when it was read. Off for producers
    # that stamp records with old event times.
    coalesce_from_publish_time: bool = True
    max_pending_changes: int = 100_000
    commit_interval_seconds: float = 5.0
    shutdown_grace_seconds: float = 20.0
    revoke_deadline_seconds: float = 10.0
    retry_max_backoff_seconds: float = 60.0
    ac_bulk_import: bool = True
    bulk_min_contacts: int = 10
    ac_imports_per_minute: int = 100
    import_timeout_seconds: float = 600.0
    ac_rate_share: str = "partitions"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9108
    log_level: str = "INFO"
    email_hash_key: Secret | None = None
    # The core loop's bounds (see README "Bounds").
    retry_give_up_seconds: float = 1800.0
    max_tracked_offsets: int = 1_000_000
    max_pending_bytes: int = 256 * 1024 * 1024
    list_verify_seconds: float = 300.0
    max_lists: int = 10_000
    ac_rate_guard_seconds: float = 0.04
    ac_tools_tick_every: int = 20

    @property
    def ac_base_url(self) -> str:
        """The API root every request is relative to (``.../api/3``)."""
        return f"{self.ac_api_url}/api/3"

    def consumer_config(self) -> dict[str, str]:
        """librdkafka consumer properties: user properties, then the ones the service owns."""
        cfg: dict[str, str] = {
            "session.timeout.ms": "10000",
            "heartbeat.interval.ms": "1000",
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # Bound librdkafka's prefetch so a huge backlog cannot exhaust memory.
            "queued.max.messages.kbytes": "16384",
        }
        cfg.update(self.kafka_properties)
        cfg["bootstrap.servers"] = self.kafka_bootstrap_servers
        cfg["group.id"] = self.kafka_group_id
        cfg.update(_FORCED_KAFKA)
        # The end of a partition is when a backlog's coalescing windows may close early
        # (``Coalescer.expedite``).
        cfg["enable.partition.eof"] = "true"
        return cfg

    def producer_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka producer properties for the DLQ: idempotent, acks from all replicas."""
        consumer_only = {
            "enable.partition.eof",
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "auto.offset.reset",
            "partition.assignment.strategy",
            "queued.max.messages.kbytes",
            "group.id",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "max.poll.interval.ms",
            "group.instance.id",
            "fetch.min.bytes",
            "fetch.max.bytes",
            "fetch.wait.max.ms",
            "max.partition.fetch.bytes",
            "auto.commit.interval.ms",
            "isolation.level",
            "group.protocol",
            "group.remote.assignor",
            "check.crcs",
        }
        cfg: dict[str, str | int | float | bool] = {
            k: v for k, v in self.kafka_properties.items() if k not in consumer_only
        }
        cfg["bootstrap.servers"] = self.kafka_bootstrap_servers
        # Ledger writes of one key must land in produce order (a retried write must never land
        # after a later one): idempotence gives per-partition order and no duplicates.
        cfg["enable.idempotence"] = True
        cfg["acks"] = "all"
        cfg.setdefault("linger.ms", "20")
        return cfg

    def current_token(self) -> Secret:
        """The token now: re-read from the file when one is configured (Kubernetes rotates it)."""
        if self.ac_api_token_file is not None:
            return _read_token_file(self.ac_api_token_file)
        return self.ac_api_token


def _read_token_file(path: Path) -> Secret:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("AC_API_TOKEN_FILE", f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError("AC_API_TOKEN_FILE", f"{path} is empty")
    return Secret(value)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _required(env: Mapping[str, str], name: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ConfigError(name, "is required but not set")
    return value


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float
) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(name, f"must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d+", raw):
        raise ConfigError(name, f"must be a whole number, got {raw!r}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ConfigError(name, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (_get(env, name) or default).lower()
    if raw not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}")
    return raw


def _url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # Never echo the value: a user may have pasted a token into the wrong variable.
        raise ConfigError(name, "must be an http(s) URL such as https://ACCOUNT.api-us1.com")
    return raw.rstrip("/")


def _kafka_properties(env: Mapping[str, str]) -> dict[str, str]:
    props: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith("KAFKA_PROPERTY_"):
            continue
        suffix = key.removeprefix("KAFKA_PROPERTY_")
        if not suffix or not re.fullmatch(r"[A-Za-z0-9_]+", suffix):
            raise ConfigError(key, "must look like KAFKA_PROPERTY_SESSION_TIMEOUT_MS")
        name = suffix.lower().replace("_", ".")
        if name in _FORCED_KAFKA:
            raise ConfigError(key, f"{name} is managed by the service and cannot be overridden")
        props[name] = value
    return props


def _template(env: Mapping[str, str]) -> str:
    name = "LIST_NAME_TEMPLATE"
    template = _get(env, name) or "{audience_name}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(name, f"is not a valid template: {exc}") from None
    unknown = sorted({f for f in fields if f not in LIST_TEMPLATE_FIELDS})
    if unknown:
        allowed = ", ".join("{" + f + "}" for f in sorted(LIST_TEMPLATE_FIELDS))
        raise ConfigError(name, f"unknown field(s) {unknown}; allowed: {allowed}")
    if not fields:
        raise ConfigError(name, "must use at least one event field, e.g. {audience_name}")
    return template


def _list_mapping(env: Mapping[str, str]) -> dict[str, ListTarget]:
    name = "LIST_MAPPING_FILE"
    raw = _get(env, name)
    if raw is None:
        return {}
    try:
        data = json.loads(Path(raw).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(name, f"cannot read {raw}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            name, f"{raw} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(name, "must hold a JSON object from audience_id to a list")
    mapping: dict[str, ListTarget] = {}
    for audience_id, target in data.items():
        if isinstance(target, str) and target:
            mapping[audience_id] = ListTarget(list_name=target)
        elif isinstance(target, dict) and isinstance(target.get("list_id"), str | int):
            mapping[audience_id] = ListTarget(list_id=str(target["list_id"]))
        elif isinstance(target, dict) and isinstance(target.get("list_name"), str):
            mapping[audience_id] = ListTarget(list_name=target["list_name"])
        else:
            raise ConfigError(
                name,
                f"entry {audience_id!r} must be a list name or an object with list_id or list_name",
            )
    return mapping


def _pairs(env: Mapping[str, str], name: str, default: Mapping[str, str]) -> dict[str, str]:
    """Parse ``a=b,c=d``."""
    raw = _get(env, name)
    if raw is None:
        return dict(default)
    result: dict[str, str] = {}
    for item in raw.split(","):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ConfigError(
                name, f"must look like first_name=firstName,phone=phone; bad {item!r}"
            )
        result[left.strip()] = right.strip()
    return result


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build and validate settings from an environment mapping. Raises ``ConfigError``."""
    topic = _required(env, "KAFKA_TOPIC")
    bootstrap = _required(env, "KAFKA_BOOTSTRAP_SERVERS")
    api_url = _url("AC_API_URL", _required(env, "AC_API_URL"))
    if api_url.endswith("/api/3"):
        api_url = api_url.removesuffix("/api/3")

    token_raw = _get(env, "AC_API_TOKEN")
    token_file_raw = _get(env, "AC_API_TOKEN_FILE")
    token_file: Path | None = None
    if token_raw and token_file_raw:
        raise ConfigError("AC_API_TOKEN", "set either AC_API_TOKEN or AC_API_TOKEN_FILE, not both")
    if token_file_raw:
        token_file = Path(token_file_raw)
        token = _read_token_file(token_file)
    elif token_raw:
        token = Secret(token_raw)
    else:
        raise ConfigError("AC_API_TOKEN", "is required (or AC_API_TOKEN_FILE)")

    registry = _get(env, "SCHEMA_REGISTRY_URL")
    log_level = (_get(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}")
    hash_key = _get(env, "EMAIL_HASH_KEY")

    field_map = _pairs(env, "AC_FIELD_MAP", {})
    for attr, field_id in field_map.items():
        if not field_id.isdigit():
            raise ConfigError("AC_FIELD_MAP", f"{attr} must map to a numeric custom field id")

    return Settings(
        kafka_bootstrap_servers=bootstrap,
        kafka_topic=topic,
        kafka_group_id=_get(env, "KAFKA_GROUP_ID") or "ac-audience-sync",
        kafka_dlq_topic=_get(env, "KAFKA_DLQ_TOPIC") or f"{topic}.dlq",
        kafka_ledger_topic=_get(env, "KAFKA_LEDGER_TOPIC") or f"{topic}.ledger",
        kafka_properties=_kafka_properties(env),
        schema_registry_url=_url("SCHEMA_REGISTRY_URL", registry) if registry else None,
        ac_api_url=api_url,
        ac_api_token=token,
        ac_api_token_file=token_file,
        ac_rate_limit_per_second=_number(
            env, "AC_RATE_LIMIT_PER_SECOND", 5.0, minimum=0.01, maximum=1000.0
        ),
        ac_concurrency=_integer(env, "AC_CONCURRENCY", 8, minimum=1, maximum=64),
        ac_request_timeout_seconds=_number(
            env, "AC_REQUEST_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=300.0
        ),
        ac_create_lists=_boolean(env, "AC_CREATE_LISTS", True),
        ac_list_sender_url=_url(
            "AC_LIST_SENDER_URL", _get(env, "AC_LIST_SENDER_URL") or "https://www.example.com"
        ),
        ac_list_sender_reminder=_get(env, "AC_LIST_SENDER_REMINDER")
        or Settings.ac_list_sender_reminder,
        list_name_template=_template(env),
        list_mapping=_list_mapping(env),
        attribute_map=_pairs(env, "AC_ATTRIBUTE_MAP", DEFAULT_ATTRIBUTE_MAP),
        field_map=field_map,
        coalesce_window_seconds=_number(
            env, "COALESCE_WINDOW_SECONDS", 5.0, minimum=0.0, maximum=3600.0
        ),
        coalesce_from_publish_time=_boolean(env, "COALESCE_FROM_PUBLISH_TIME", True),
        max_pending_changes=_integer(
            env, "MAX_PENDING_CHANGES", 100_000, minimum=10, maximum=10_000_000
        ),
        commit_interval_seconds=_number(
            env, "COMMIT_INTERVAL_SECONDS", 5.0, minimum=0.05, maximum=600.0
        ),
        shutdown_grace_seconds=_number(
            env, "SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0, maximum=3600.0
        ),
        revoke_deadline_seconds=_number(
            env, "REVOKE_DEADLINE_SECONDS", 10.0, minimum=0.0, maximum=600.0
        ),
        retry_max_backoff_seconds=_number(
            env, "RETRY_MAX_BACKOFF_SECONDS", 60.0, minimum=0.1, maximum=3600.0
        ),
        ac_bulk_import=_boolean(env, "AC_BULK_IMPORT", True),
        bulk_min_contacts=_integer(env, "BULK_MIN_CONTACTS", 10, minimum=2, maximum=250),
        ac_imports_per_minute=_integer(env, "AC_IMPORTS_PER_MINUTE", 100, minimum=1, maximum=100),
        import_timeout_seconds=_number(
            env, "IMPORT_TIMEOUT_SECONDS", 600.0, minimum=5.0, maximum=86400.0
        ),
        ac_rate_share=_choice(env, "AC_RATE_SHARE", ("partitions", "none"), "partitions"),
        metrics_host=_get(env, "METRICS_HOST") or "0.0.0.0",
        metrics_port=_integer(env, "METRICS_PORT", 9108, minimum=0, maximum=65535),
        log_level=log_level,
        email_hash_key=Secret(hash_key) if hash_key else None,
        retry_give_up_seconds=_number(
            env, "RETRY_GIVE_UP_SECONDS", 1800.0, minimum=10.0, maximum=7 * 86400.0
        ),
        max_tracked_offsets=_integer(
            env, "MAX_TRACKED_OFFSETS", 1_000_000, minimum=100, maximum=100_000_000
        ),
        max_pending_bytes=_integer(
            env, "MAX_PENDING_BYTES", 256 * 1024 * 1024, minimum=1024 * 1024, maximum=2**40
        ),
        list_verify_seconds=_number(
            env, "LIST_VERIFY_SECONDS", 300.0, minimum=1.0, maximum=86400.0
        ),
        max_lists=_integer(env, "MAX_LISTS", 10_000, minimum=1, maximum=1_000_000),
        ac_rate_guard_seconds=_number(env, "AC_RATE_GUARD_SECONDS", 0.04, minimum=0.0, maximum=1.0),
        ac_tools_tick_every=_integer(env, "AC_TOOLS_TICK_EVERY", 20, minimum=0, maximum=1000),
    )
