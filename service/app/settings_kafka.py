"""librdkafka properties from the environment: ``KAFKA_PROPERTY_<NAME>`` (or
``KAFKA_PROPERTY_<NAME>_FILE``) -> the property ``<name>`` (lower case, ``_`` -> ``.``), and the
SASL settings they must include. ``Settings.consumer_config``/``producer_config`` merge them
with the properties the service sets.

Invariants:
- the properties the service owns (``enable.auto.commit``, ``enable.auto.offset.store``: offsets
  are committed only after the changes they carry are done) cannot be overridden;
- a property from a file, or whose name says it holds a secret (password, key, JAAS, ...), is
  held in a ``Secret``;
- SASL with a password mechanism needs ``sasl.username`` and ``sasl.password``: the problem
  names the variables to set (librdkafka's own message names neither variables nor files).

The properties' values are checked by building the clients (``check.validate_kafka_clients``),
which ``run``, ``check``, ``explain`` and ``reconcile`` call before anything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from service.app.settings import _FORCED_KAFKA, Secret, _read_secret_file
from service.app.settings_parsers import _get
from service.core.errors import ConfigError

# librdkafka properties whose values are secrets even when set inline (not from a file).
_SECRET_PROPERTY = re.compile(r"password|secret|key\.pem|private\.key|oauthbearer\.config|jaas")

# SASL mechanisms that authenticate with sasl.username / sasl.password.
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


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
