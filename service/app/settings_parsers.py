"""Parsers of environment variables, for ``load_settings`` (``settings_loader.py``): each reads
one variable (or a few that go together) and raises ``ConfigError`` naming the variable.

Invariants:
- no error message contains a configured value (a token pasted into the wrong variable must not
  end up in a log): messages say what was expected, never what was found;
- every secret can be read from a file: ``NAME_FILE`` (a mounted Kubernetes Secret) instead of
  ``NAME``; setting both is an error; a secret is returned as a ``Secret``;
- a URL the service sends credentials to (``service_url``) is ``https://`` (``http://`` only
  for a loopback host), without user name, password, query or fragment.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from service.app.settings import ConfigProblems, Secret, _read_secret_file
from service.core.errors import ConfigError
from service.core.lists import ListTarget

LIST_TEMPLATE_FIELDS = frozenset({"audience_id", "audience_name", "campaign_id", "treatment_group"})
# Domains reserved for documentation (RFC 2606): a list's sender URL is shown to recipients.
_EXAMPLE_DOMAIN = re.compile(r"(^|\.)(example\.(com|net|org)|example)\.?$", re.I)

T = TypeVar("T")


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
