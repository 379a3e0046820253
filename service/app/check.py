"""``ac-audience-sync check``: one verdict per item, non-zero exit on any failure."""

from __future__ import annotations

import httpx
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from service.adapters.activecampaign import ActiveCampaignClient
from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
from service.app.settings import Settings
from service.core.errors import ApiError, AuthRejected, ConfigError
from service.metrics import Metrics


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
    limiter = RateLimiter(1.0)
    with httpx.Client(
        base_url=settings.ac_base_url + "/",
        transport=RateLimitedTransport(httpx.HTTPTransport(), limiter),
        timeout=timeout,
    ) as http:
        client = ActiveCampaignClient(http, token.reveal, Metrics(CollectorRegistry()))
        try:
            client.request("GET", "/lists", "lists", params={"limit": "1"})
        except AuthRejected as exc:
            return _line(
                False,
                "ActiveCampaign token",
                f"refused by {settings.ac_api_url} (HTTP {exc.status})",
            )
        except ApiError as exc:
            return _line(False, "ActiveCampaign token", f"{settings.ac_api_url} answered: {exc}")
    return _line(True, "ActiveCampaign token", f"accepted by {settings.ac_api_url}")


def run_checks(settings: Settings, *, timeout: float) -> int:
    results = check_kafka(settings, timeout)
    results.append(check_token(settings, timeout))
    return 0 if all(results) else 1
