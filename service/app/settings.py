"""Configuration from the environment: validated once at start-up into a frozen ``Settings``.

Invariants:
- every problem is reported as ``ConfigError(field, why)`` naming the environment variable, and
  ``load_settings`` reports **all** of them at once (``ConfigProblems``, one per problem);
- no error message contains a configured value (a token pasted into the wrong variable must not
  end up in a log): messages say what was expected, never what was found;
- every secret (the AC token, the email hash key, the schema registry credentials, and the
  librdkafka properties that hold secrets or come from a ``*_FILE``) is held in a ``Secret``
  whose ``str``/``repr`` never reveal it, so neither does ``repr(Settings)``;
- every secret can be read from a file: ``NAME_FILE`` (a mounted Kubernetes Secret) instead of
  ``NAME``; setting both is an error;
- the librdkafka dicts built here always have ``enable.auto.commit=false`` (offsets are committed
  by the runner only after the changes they carry are done) and route librdkafka's logs through
  Python logging (``logs.kafka_logger``), so every log line is JSON.

The librdkafka properties themselves are checked by building the clients
(``check.validate_kafka_clients``), which ``run``, ``check``, ``explain`` and ``reconcile`` call
before anything else.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from service.app.logs import kafka_logger
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
# librdkafka properties whose values are secrets even when set inline (not from a file).
_SECRET_PROPERTY = re.compile(r"password|secret|key\.pem|private\.key|oauthbearer\.config|jaas")
# SASL mechanisms that authenticate with sasl.username / sasl.password.
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Domains reserved for documentation (RFC 2606): a list's sender URL is shown to recipients.
_EXAMPLE_DOMAIN = re.compile(r"(^|\.)(example\.(com|net|org)|example)\.?$", re.I)

T = TypeVar("T")
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


# ---- parsers: each raises ConfigError naming the variable, never echoing the value ----------


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


def _secret(env: Mapping[str, str], name: str) -> Secret | None:
    """``NAME`` or the content of the file named by ``NAME_FILE`` (trimmed); not both."""
    inline = _get(env, name)
    path = _get(env, f"{name}_FILE")
    if inline is not None and path is not None:
        raise ConfigError(name, f"set either {name} or {name}_FILE, not both")
    if path is not None:
        return _read_secret_file(f"{name}_FILE", Path(path))
    return Secret(inline) if inline is not None else None


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float
) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ConfigError(name, f"must be a number between {minimum:g} and {maximum:g}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d{1,12}", raw) or not minimum <= int(raw) <= maximum:
        raise ConfigError(name, f"must be a whole number between {minimum} and {maximum}")
    return int(raw)


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, "must be true or false")


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (_get(env, name) or default).lower()
    if raw not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}")
    return raw


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: where plain ``http://`` is allowed (the emulator)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def service_url(name: str, raw: str, *, api_path: str | None) -> str:
    """A URL this service sends credentials to: ``https://HOST[:PORT][PATH]``, no user name or
    password, query or fragment; ``http://`` only for a loopback host. ``api_path`` set: the
    only path allowed besides none (returned without it); ``None``: any path. Never echoes
    ``raw`` (a user may have pasted a token into the wrong variable)."""
    shape = "https://HOST[:PORT]" + (f"[{api_path}]" if api_path else "[/PATH]")
    if re.search(r"[\x00-\x20\x7f]", raw):
        raise ConfigError(name, f"must be a URL like {shape}, without spaces or control characters")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(name, f"must be a URL like {shape} (the port is not valid)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"must be a URL like {shape}")
    if "@" in parts.netloc:
        raise ConfigError(
            name, "must not contain a user name or password (credentials have their own variables)"
        )
    if "?" in raw:
        raise ConfigError(name, "must not have a query string")
    if "#" in raw:
        raise ConfigError(name, "must not have a fragment (#...)")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            name, "must use https:// (http:// only for a loopback host such as 127.0.0.1)"
        )
    path = parts.path.rstrip("/")
    if api_path is not None:
        if path not in ("", api_path):
            raise ConfigError(name, f"must be a URL like {shape}: no other path")
        path = ""
    return f"{parts.scheme}://{parts.netloc}{path}"


def _link_url(name: str, raw: str) -> str:
    """A URL AC shows to people (not one we send anything to): http(s), no credentials."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise ConfigError(name, "must be an http(s) URL such as https://www.yourcompany.com")
    return raw.rstrip("/")


def _kafka_properties(
    env: Mapping[str, str], problems: list[ConfigError]
) -> tuple[dict[str, str], dict[str, Secret]]:
    """``KAFKA_PROPERTY_<NAME>`` (or ``KAFKA_PROPERTY_<NAME>_FILE``) -> librdkafka properties:
    plain ones and secret ones."""
    plain: dict[str, str] = {}
    secret: dict[str, Secret] = {}
    for key in sorted(env):
        if not key.startswith("KAFKA_PROPERTY_"):
            continue
        suffix = key.removeprefix("KAFKA_PROPERTY_")
        from_file = suffix.endswith("_FILE")
        if from_file:
            suffix = suffix.removesuffix("_FILE")
        if not suffix or not re.fullmatch(r"[A-Za-z0-9_]+", suffix):
            problems.append(ConfigError(key, "must look like KAFKA_PROPERTY_SESSION_TIMEOUT_MS"))
            continue
        name = suffix.lower().replace("_", ".")
        variable = f"KAFKA_PROPERTY_{suffix}"
        if name in _FORCED_KAFKA:
            problems.append(
                ConfigError(key, f"{name} is managed by the service and cannot be overridden")
            )
            continue
        if from_file:
            if variable in env:
                problems.append(
                    ConfigError(variable, f"set either {variable} or {variable}_FILE, not both")
                )
                continue
            path = _get(env, key)
            if path is None:
                problems.append(ConfigError(key, "is empty: it must name a file"))
                continue
            try:
                secret[name] = _read_secret_file(key, Path(path))
            except ConfigError as exc:
                problems.append(exc)
        elif _SECRET_PROPERTY.search(name):
            secret[name] = Secret(env[key])
        else:
            plain[name] = env[key]
    return plain, secret


def _sasl_problems(props: Mapping[str, str]) -> list[ConfigError]:
    """SASL with a password mechanism needs sasl.username and sasl.password: say which
    variables to set (librdkafka's own message names neither the variables nor the files)."""
    protocol = props.get("security.protocol", "").upper()
    if not protocol.startswith("SASL"):
        return []
    mechanism = (props.get("sasl.mechanism") or props.get("sasl.mechanisms") or "").upper()
    if not mechanism:
        return [
            ConfigError(
                "KAFKA_PROPERTY_SASL_MECHANISM",
                f"security.protocol={protocol} needs a SASL mechanism: set it to one of "
                f"{', '.join(_PASSWORD_MECHANISMS)} or OAUTHBEARER",
            )
        ]
    if mechanism not in _PASSWORD_MECHANISMS:
        return []
    return [
        ConfigError(
            variable,
            f"is required with security.protocol={protocol} and sasl.mechanism={mechanism}: set "
            f"{variable} or {variable}_FILE (a file holding it, e.g. from a Kubernetes Secret)",
        )
        for prop, variable in (
            ("sasl.username", "KAFKA_PROPERTY_SASL_USERNAME"),
            ("sasl.password", "KAFKA_PROPERTY_SASL_PASSWORD"),
        )
        if not props.get(prop)
    ]


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
        raise ConfigError(name, f"may only use the fields {allowed}")
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f": {exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(name, f"{raw} is not valid JSON{where}") from None
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
    for number, item in enumerate(raw.split(","), 1):
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ConfigError(
                name, f"must look like first_name=firstName,phone=phone (item {number} does not)"
            )
        result[left.strip()] = right.strip()
    return result


def _field_map(env: Mapping[str, str]) -> dict[str, str]:
    field_map = _pairs(env, "AC_FIELD_MAP", {})
    for number, field_id in enumerate(field_map.values(), 1):
        if not field_id.isdigit():
            raise ConfigError(
                "AC_FIELD_MAP",
                f"must map each attribute to a numeric custom field id (item {number} does not)",
            )
    return field_map


def _readable_file(env: Mapping[str, str], name: str) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    try:
        with open(raw, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(name, f"cannot read {raw}: {exc.strerror}") from None
    return raw


def _user_info(env: Mapping[str, str]) -> Secret | None:
    name = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"
    secret = _secret(env, name)
    if secret is not None:
        user, sep, _password = secret.reveal().partition(":")
        if not sep or not user:
            raise ConfigError(name, "must look like USER:PASSWORD")
    return secret


def _token(env: Mapping[str, str]) -> tuple[Secret, Path | None]:
    inline = _get(env, "AC_API_TOKEN")
    path = _get(env, "AC_API_TOKEN_FILE")
    if inline is not None and path is not None:
        raise ConfigError("AC_API_TOKEN", "set either AC_API_TOKEN or AC_API_TOKEN_FILE, not both")
    if path is not None:
        return _read_secret_file("AC_API_TOKEN_FILE", Path(path)), Path(path)
    if inline is not None:
        return Secret(inline), None
    raise ConfigError("AC_API_TOKEN", "is required (or AC_API_TOKEN_FILE)")


def _sender_url(env: Mapping[str, str], create_lists: bool) -> str:
    name = "AC_LIST_SENDER_URL"
    raw = _get(env, name)
    if raw is None:
        if create_lists:
            raise ConfigError(
                name,
                "is required while AC_CREATE_LISTS is true (AC shows it to the recipients of the "
                "lists the service creates): set your organisation's website, or set "
                "AC_CREATE_LISTS=false",
            )
        return ""
    url = _link_url(name, raw)
    host = urlsplit(url).hostname or ""
    if create_lists and _EXAMPLE_DOMAIN.search(host):
        raise ConfigError(
            name,
            "is an example domain: lists created with it would point recipients there; set your "
            "organisation's website, or set AC_CREATE_LISTS=false",
        )
    return url


class _Collector:
    """Runs each parser, keeping every ``ConfigError`` instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[ConfigError] = []

    def __call__(self, parse: Callable[[], T], default: T) -> T:
        try:
            return parse()
        except ConfigProblems as exc:
            self.problems.extend(exc.problems)
        except ConfigError as exc:
            self.problems.append(exc)
        return default


def _tools_tick_every(env: Mapping[str, str]) -> int:
    value = _integer(env, "AC_TOOLS_TICK_EVERY", 20, minimum=0, maximum=1000)
    if value == 1:
        raise ConfigError("AC_TOOLS_TICK_EVERY", "must be 0 (no ticks for tools) or at least 2")
    return value


STALE_DEFAULT: float | None = 60.0


def _stale_tolerance(env: Mapping[str, str]) -> float | None:
    if (_get(env, "STALE_EVENT_TOLERANCE_SECONDS") or "").strip().lower() == "off":
        return None
    return _number(env, "STALE_EVENT_TOLERANCE_SECONDS", 60.0, minimum=0.0, maximum=30 * 86400.0)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build and validate settings from an environment mapping. Raises ``ConfigProblems``
    listing every problem found (a ``ConfigError``)."""
    take = _Collector()
    problems = take.problems

    topic = take(lambda: _required(env, "KAFKA_TOPIC"), "")
    bootstrap = take(lambda: _required(env, "KAFKA_BOOTSTRAP_SERVERS"), "")
    plain, secret_props = _kafka_properties(env, problems)
    problems += _sasl_problems({**plain, **{k: v.reveal() for k, v in secret_props.items()}})

    registry = _get(env, "SCHEMA_REGISTRY_URL")
    registry_url = (
        take(lambda: service_url("SCHEMA_REGISTRY_URL", registry, api_path=None), None)
        if registry
        else None
    )
    user_info = take(lambda: _user_info(env), None)
    ca = take(lambda: _readable_file(env, "SCHEMA_REGISTRY_CA_LOCATION"), None)
    cert = take(lambda: _readable_file(env, "SCHEMA_REGISTRY_CERT_LOCATION"), None)
    key = take(lambda: _readable_file(env, "SCHEMA_REGISTRY_KEY_LOCATION"), None)
    registry_timeout = take(
        lambda: _number(env, "SCHEMA_REGISTRY_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=300.0),
        10.0,
    )
    if registry is None:
        problems += [
            ConfigError(name, "has no effect without SCHEMA_REGISTRY_URL")
            for name in (
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE",
                "SCHEMA_REGISTRY_CA_LOCATION",
                "SCHEMA_REGISTRY_CERT_LOCATION",
                "SCHEMA_REGISTRY_KEY_LOCATION",
            )
            if _get(env, name) is not None
        ]
    for one, other in (
        ("SCHEMA_REGISTRY_CERT_LOCATION", "SCHEMA_REGISTRY_KEY_LOCATION"),
        ("SCHEMA_REGISTRY_KEY_LOCATION", "SCHEMA_REGISTRY_CERT_LOCATION"),
    ):
        if _get(env, one) is not None and _get(env, other) is None:
            problems.append(ConfigError(other, f"is required with {one} (a client certificate)"))

    api_url_raw = take(lambda: _required(env, "AC_API_URL"), "")
    api_url = (
        take(lambda: service_url("AC_API_URL", api_url_raw, api_path="/api/3"), "")
        if api_url_raw
        else ""
    )
    no_token: tuple[Secret, Path | None] = (Secret(""), None)
    token, token_file = take(lambda: _token(env), no_token)

    log_level = (_get(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        problems.append(ConfigError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}"))
        log_level = "INFO"
    hash_key = take(lambda: _secret(env, "EMAIL_HASH_KEY"), None)
    create_lists = take(lambda: _boolean(env, "AC_CREATE_LISTS", True), True)

    group = _get(env, "KAFKA_GROUP_ID") or "ac-audience-sync"
    preview_group = _get(env, "KAFKA_PREVIEW_GROUP_ID") or f"{group}.preview"
    if preview_group == group:
        # A preview in the live group would take its partitions and commit its offsets.
        problems.append(
            ConfigError(
                "KAFKA_PREVIEW_GROUP_ID", "must differ from KAFKA_GROUP_ID (the live group)"
            )
        )

    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        kafka_topic=topic,
        kafka_group_id=group,
        kafka_dlq_topic=_get(env, "KAFKA_DLQ_TOPIC") or f"{topic}.dlq",
        kafka_ledger_topic=_get(env, "KAFKA_LEDGER_TOPIC") or f"{topic}.ledger",
        kafka_properties=plain,
        kafka_secrets=secret_props,
        schema_registry_url=registry_url,
        schema_registry_basic_auth_user_info=user_info,
        schema_registry_ca_location=ca,
        schema_registry_cert_location=cert,
        schema_registry_key_location=key,
        schema_registry_timeout_seconds=registry_timeout,
        ac_api_url=api_url,
        ac_api_token=token,
        ac_api_token_file=token_file,
        ac_rate_limit_per_second=take(
            lambda: _number(env, "AC_RATE_LIMIT_PER_SECOND", 5.0, minimum=0.01, maximum=1000.0),
            5.0,
        ),
        ac_concurrency=take(lambda: _integer(env, "AC_CONCURRENCY", 8, minimum=1, maximum=64), 8),
        ac_request_timeout_seconds=take(
            lambda: _number(env, "AC_REQUEST_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=300.0),
            10.0,
        ),
        ac_create_lists=create_lists,
        ac_list_sender_url=take(lambda: _sender_url(env, create_lists), ""),
        ac_list_sender_reminder=_get(env, "AC_LIST_SENDER_REMINDER")
        or Settings.ac_list_sender_reminder,
        list_name_template=take(lambda: _template(env), "{audience_name}"),
        list_mapping=take(lambda: _list_mapping(env), {}),
        attribute_map=take(
            lambda: _pairs(env, "AC_ATTRIBUTE_MAP", DEFAULT_ATTRIBUTE_MAP),
            dict(DEFAULT_ATTRIBUTE_MAP),
        ),
        field_map=take(lambda: _field_map(env), {}),
        coalesce_window_seconds=take(
            lambda: _number(env, "COALESCE_WINDOW_SECONDS", 5.0, minimum=0.0, maximum=3600.0), 5.0
        ),
        coalesce_from_publish_time=take(
            lambda: _boolean(env, "COALESCE_FROM_PUBLISH_TIME", True), True
        ),
        max_pending_changes=take(
            lambda: _integer(env, "MAX_PENDING_CHANGES", 100_000, minimum=10, maximum=10_000_000),
            100_000,
        ),
        commit_interval_seconds=take(
            lambda: _number(env, "COMMIT_INTERVAL_SECONDS", 5.0, minimum=0.05, maximum=600.0), 5.0
        ),
        shutdown_grace_seconds=take(
            lambda: _number(env, "SHUTDOWN_GRACE_SECONDS", 20.0, minimum=0.0, maximum=3600.0),
            20.0,
        ),
        revoke_deadline_seconds=take(
            lambda: _number(env, "REVOKE_DEADLINE_SECONDS", 10.0, minimum=0.0, maximum=600.0),
            10.0,
        ),
        retry_max_backoff_seconds=take(
            lambda: _number(env, "RETRY_MAX_BACKOFF_SECONDS", 60.0, minimum=0.1, maximum=3600.0),
            60.0,
        ),
        ac_bulk_import=take(lambda: _boolean(env, "AC_BULK_IMPORT", True), True),
        bulk_min_contacts=take(
            lambda: _integer(env, "BULK_MIN_CONTACTS", 10, minimum=2, maximum=250), 10
        ),
        ac_imports_per_minute=take(
            lambda: _integer(env, "AC_IMPORTS_PER_MINUTE", 100, minimum=1, maximum=100), 100
        ),
        import_timeout_seconds=take(
            lambda: _number(env, "IMPORT_TIMEOUT_SECONDS", 600.0, minimum=5.0, maximum=86400.0),
            600.0,
        ),
        import_give_up_seconds=take(
            lambda: _number(
                env, "IMPORT_GIVE_UP_SECONDS", 3600.0, minimum=5.0, maximum=7 * 86400.0
            ),
            3600.0,
        ),
        ac_rate_share=take(
            lambda: _choice(env, "AC_RATE_SHARE", ("partitions", "none"), "partitions"),
            "partitions",
        ),
        metrics_host=_get(env, "METRICS_HOST") or "0.0.0.0",
        metrics_port=take(lambda: _integer(env, "METRICS_PORT", 9108, minimum=0, maximum=65535), 0),
        log_level=log_level,
        email_hash_key=hash_key,
        retry_give_up_seconds=take(
            lambda: _number(
                env, "RETRY_GIVE_UP_SECONDS", 1800.0, minimum=10.0, maximum=7 * 86400.0
            ),
            1800.0,
        ),
        max_tracked_offsets=take(
            lambda: _integer(
                env, "MAX_TRACKED_OFFSETS", 1_000_000, minimum=100, maximum=100_000_000
            ),
            1_000_000,
        ),
        max_pending_bytes=take(
            lambda: _integer(
                env, "MAX_PENDING_BYTES", 256 * 1024 * 1024, minimum=1024 * 1024, maximum=2**40
            ),
            256 * 1024 * 1024,
        ),
        list_verify_seconds=take(
            lambda: _number(env, "LIST_VERIFY_SECONDS", 300.0, minimum=1.0, maximum=86400.0),
            300.0,
        ),
        max_lists=take(
            lambda: _integer(env, "MAX_LISTS", 10_000, minimum=1, maximum=1_000_000), 10_000
        ),
        ac_rate_guard_seconds=take(
            lambda: _number(env, "AC_RATE_GUARD_SECONDS", 0.04, minimum=0.0, maximum=1.0), 0.04
        ),
        ac_tools_tick_every=take(lambda: _tools_tick_every(env), 20),
        stale_event_tolerance_seconds=take(lambda: _stale_tolerance(env), STALE_DEFAULT),
        dlq_breaker_window=take(
            lambda: _integer(env, "DLQ_BREAKER_WINDOW", 1000, minimum=10, maximum=10_000_000),
            1000,
        ),
        dlq_breaker_max_share=take(
            lambda: _number(env, "DLQ_BREAKER_MAX_SHARE", 0.5, minimum=0.01, maximum=1.0), 0.5
        ),
        dry_run=take(lambda: _boolean(env, "AC_DRY_RUN", False), False),
        preview_group_id=preview_group,
    )
    if settings.import_give_up_seconds < settings.import_timeout_seconds:
        problems.append(
            ConfigError("IMPORT_GIVE_UP_SECONDS", "must be at least IMPORT_TIMEOUT_SECONDS")
        )
    if problems:
        raise ConfigProblems(problems)
    return settings
