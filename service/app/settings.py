"""Configuration: the frozen ``Settings`` the service runs with, its defaults, and the secrets
it holds. ``load_settings`` (``settings_loader.py``) builds it from the environment, validated
once at start-up, with the parsers of ``settings_parsers.py`` and ``settings_kafka.py``.

Invariants:
- every problem is reported as ``ConfigError(field, why)`` naming the environment variable, and
  ``load_settings`` reports **all** of them at once (``ConfigProblems``, one per problem);
- every secret (the AC token, the email hash key, the schema registry credentials, and the
  librdkafka properties that hold secrets or come from a ``*_FILE``) is held in a ``Secret``
  whose ``str``/``repr`` never reveal it, so neither does ``repr(Settings)``;
- the librdkafka dicts built here always have ``enable.auto.commit=false`` (offsets are committed
  by the runner only after the changes they carry are done) and route librdkafka's logs through
  Python logging (``logs.kafka_logger``), so every log line is JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.app.logs import kafka_logger
from service.core.errors import ConfigError
from service.core.lists import ListTarget

# Event attribute -> contact/sync field. Anything else must be mapped to a custom field id.
DEFAULT_ATTRIBUTE_MAP: Mapping[str, str] = {
    "first_name": "firstName",
    "last_name": "lastName",
    "phone": "phone",
}

# librdkafka properties the service owns: a user override would break commit-after-success.
_FORCED_KAFKA = {"enable.auto.commit": "false", "enable.auto.offset.store": "false"}

MIN_REDACTED_LENGTH = 4


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


class ConfigProblems(ConfigError):
    """Every configuration problem found at once. ``field``/``why`` are the first one's (so code
    that handles a single ``ConfigError`` still works); ``problems`` holds them all."""

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first.field, first.why + more)
        self.problems: tuple[ConfigError, ...] = tuple(problems)


def problems_of(error: ConfigError) -> tuple[ConfigError, ...]:
    """The individual problems of a ``ConfigError`` (one, or all of a ``ConfigProblems``)."""
    return error.problems if isinstance(error, ConfigProblems) else (error,)


# The group consumer's prefetch (``Settings.group_consumer_config``), unless the user set it.
_GROUP_PREFETCH = {"queued.max.messages.kbytes": "8192", "fetch.max.bytes": str(4 * 1024 * 1024)}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str
    kafka_topic: str
    kafka_group_id: str = "ac-audience-sync"
    kafka_dlq_topic: str = ""
    kafka_ledger_topic: str = ""
    # librdkafka properties: plain ones here, secret ones (from a *_FILE, or a password-like
    # name) in ``kafka_secrets``; ``consumer_config``/``producer_config`` merge both.
    kafka_properties: Mapping[str, str] = field(default_factory=dict)
    kafka_secrets: Mapping[str, Secret] = field(default_factory=dict)
    schema_registry_url: str | None = None
    schema_registry_basic_auth_user_info: Secret | None = None  # "USER:PASSWORD"
    schema_registry_ca_location: str | None = None
    schema_registry_cert_location: str | None = None
    schema_registry_key_location: str | None = None
    schema_registry_timeout_seconds: float = 10.0
    ac_api_url: str = ""
    ac_api_token: Secret = field(default_factory=lambda: Secret(""))
    ac_api_token_file: Path | None = None
    ac_rate_limit_per_second: float = 5.0
    ac_concurrency: int = 8
    ac_request_timeout_seconds: float = 10.0
    ac_create_lists: bool = True
    # Required when ``ac_create_lists`` (no default: AC shows it to recipients of new lists).
    ac_list_sender_url: str = ""
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
    # A newly assigned partition's backlog is read ahead, so only each (email, list)'s final
    # state is sent (README "Backlogs"): at most this many keys (0: off), this long.
    read_ahead_max_keys: int = 500_000
    read_ahead_max_seconds: float = 120.0
    commit_interval_seconds: float = 5.0
    shutdown_grace_seconds: float = 20.0
    revoke_deadline_seconds: float = 10.0
    retry_max_backoff_seconds: float = 60.0
    ac_bulk_import: bool = True
    bulk_min_contacts: int = 10
    ac_imports_per_minute: int = 100
    import_timeout_seconds: float = 600.0
    import_give_up_seconds: float = 3600.0
    ac_rate_share: str = "partitions"
    # All interfaces of the pod's own network namespace: the kubelet's probes and Prometheus
    # reach the pod IP, ``kubectl exec ... localhost`` the loopback (README "Configuration").
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
    # The staleness guard's tolerance (None: off): see README "The ledger".
    stale_event_tolerance_seconds: float | None = 60.0
    # The dead-letter breaker: more than this share of a partition's last ``window`` records
    # poison pauses it (1.0: never).
    dlq_breaker_window: int = 1000
    dlq_breaker_max_share: float = 0.5
    # The preview (``run --dry-run``): writes nothing, consumes with a group of its own.
    dry_run: bool = False
    preview_group_id: str = "ac-audience-sync.preview"

    @property
    def ac_base_url(self) -> str:
        """The API root every request is relative to (``.../api/3``)."""
        return f"{self.ac_api_url}/api/3"

    def kafka_user_properties(self) -> dict[str, str]:
        """Every librdkafka property the user set, secrets revealed (for building clients)."""
        props = dict(self.kafka_properties)
        props.update({k: v.reveal() for k, v in self.kafka_secrets.items()})
        return props

    def consumer_config(self) -> dict[str, Any]:
        """librdkafka consumer properties: user properties, then the ones the service owns."""
        cfg: dict[str, Any] = {
            "session.timeout.ms": "10000",
            "heartbeat.interval.ms": "1000",
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # Bound librdkafka's prefetch so a huge backlog cannot exhaust memory.
            "queued.max.messages.kbytes": "16384",
        }
        cfg.update(self.kafka_user_properties())
        cfg["bootstrap.servers"] = self.kafka_bootstrap_servers
        cfg["group.id"] = self.kafka_group_id
        cfg.update(_FORCED_KAFKA)
        # The end of a partition is when a backlog's coalescing windows may close early
        # (``Coalescer.expedite``).
        cfg["enable.partition.eof"] = "true"
        cfg["logger"] = kafka_logger()
        return cfg

    def group_consumer_config(self) -> dict[str, Any]:
        """``consumer_config`` for the group's consumer (the one that feeds the pipeline), with
        a smaller prefetch unless the user set one. A backlog waits in the pending bound, not
        in librdkafka's queue: 8 MiB queued (~50,000 records) keeps the loop fed, and fetches
        of at most 4 MiB keep each response buffer small (a buffer lives until its last record
        is freed). The private readers (ledger restore, read-ahead) keep the larger prefetch:
        they read once, as fast as they can, and close."""
        cfg = self.consumer_config()
        user = self.kafka_user_properties()
        for name, value in _GROUP_PREFETCH.items():
            if name not in user:
                cfg[name] = value
        return cfg

    def producer_config(self) -> dict[str, Any]:
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
        cfg: dict[str, Any] = {
            k: v for k, v in self.kafka_user_properties().items() if k not in consumer_only
        }
        cfg["bootstrap.servers"] = self.kafka_bootstrap_servers
        # Ledger writes of one key must land in produce order (a retried write must never land
        # after a later one): idempotence gives per-partition order and no duplicates.
        cfg["enable.idempotence"] = True
        cfg["acks"] = "all"
        cfg.setdefault("linger.ms", "20")
        cfg["logger"] = kafka_logger()
        return cfg

    def secret_values(self) -> list[str]:
        """Every secret's value: what ``redact`` removes from any text printed."""
        found = [self.ac_api_token.reveal()]
        found += [s.reveal() for s in self.kafka_secrets.values()]
        for secret in (self.email_hash_key, self.schema_registry_basic_auth_user_info):
            if secret is not None:
                found.append(secret.reveal())
        if self.schema_registry_basic_auth_user_info is not None:
            found.append(self.schema_registry_basic_auth_user_info.reveal().partition(":")[2])
        return [s for s in found if len(s) >= MIN_REDACTED_LENGTH]

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***`` (for messages from libraries).
        Values shorter than ``MIN_REDACTED_LENGTH`` are left: they are no secret, and replacing
        them would garble the message."""
        for value in sorted(self.secret_values(), key=len, reverse=True):
            text = text.replace(value, "***")
        return text

    def current_token(self) -> Secret:
        """The token now: re-read from the file when one is configured (Kubernetes rotates it)."""
        if self.ac_api_token_file is not None:
            return _read_secret_file("AC_API_TOKEN_FILE", self.ac_api_token_file)
        return self.ac_api_token


def _read_secret_file(name: str, path: Path) -> Secret:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(name, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, f"{path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(name, f"{path} is empty")
    return Secret(value)
