"""``ac-audience-sync check``: one verdict per item, non-zero exit on any failure."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from service.adapters.ac_http import AcTool
from service.app.settings import Settings
from service.core import acapi
from service.core.errors import AccountBlocked, ApiError, ConfigError


def _line(ok: bool, item: str, detail: str = "") -> bool:
    print(f"{'OK  ' if ok else 'FAIL'}  {item}{': ' + detail if detail else ''}", flush=True)
    return ok


def check_kafka(settings: Settings, timeout: float) -> list[bool]:
    admin = AdminClient(dict(settings.producer_config()))
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception as exc:
        return [
            _line(False, "broker", f"{settings.kafka_bootstrap_servers} did not answer ({exc})")
        ]
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
    return results


def check_token(settings: Settings, timeout: float) -> bool:
    try:
        token = settings.current_token()
    except ConfigError as exc:
        return _line(False, "ActiveCampaign token", f"{exc.field}: {exc.why}")
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
        return _line(
            False, "ActiveCampaign token", f"refused by {settings.ac_api_url} (HTTP {exc.status})"
        )
    except ApiError as exc:
        return _line(False, "ActiveCampaign token", f"{settings.ac_api_url} answered: {exc}")
    finally:
        tool.close()
    return _line(True, "ActiveCampaign token", f"accepted by {settings.ac_api_url}")


def run_checks(settings: Settings, *, timeout: float) -> int:
    results = check_kafka(settings, timeout)
    results.append(check_token(settings, timeout))
    return 0 if all(results) else 1
