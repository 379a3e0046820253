"""``load_settings``: the environment -> a validated ``Settings``, once at start-up.

Invariants:
- every problem is reported as ``ConfigError(field, why)`` naming the environment variable, and
  ``load_settings`` reports **all** of them at once (``ConfigProblems``, one per problem): each
  parser runs through ``_Collector``, which keeps its error and goes on with a default;
- no error message contains a configured value (``settings_parsers``);
- what only makes sense together is checked together (registry options without a registry, a
  client certificate without its key, the preview group equal to the live one, an import
  give-up shorter than its timeout).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from service.app.settings import DEFAULT_ATTRIBUTE_MAP, ConfigProblems, Secret, Settings
from service.app.settings_kafka import _kafka_properties, _sasl_problems
from service.app.settings_parsers import (
    STALE_DEFAULT,
    _boolean,
    _choice,
    _Collector,
    _field_map,
    _get,
    _integer,
    _list_mapping,
    _number,
    _pairs,
    _readable_file,
    _required,
    _secret,
    _sender_url,
    _stale_tolerance,
    _template,
    _token,
    _tools_tick_every,
    _user_info,
    service_url,
)
from service.core.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
        read_ahead_max_keys=take(
            lambda: _integer(env, "READ_AHEAD_MAX_KEYS", 500_000, minimum=0, maximum=100_000_000),
            500_000,
        ),
        read_ahead_max_seconds=take(
            lambda: _number(env, "READ_AHEAD_MAX_SECONDS", 120.0, minimum=0.0, maximum=3600.0),
            120.0,
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
