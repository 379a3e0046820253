"""Wiring: the only place that builds real clients (Kafka, httpx, the schema registry) and hands
them to the pipeline. Used by ``run``, the demo and the integration tests."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from service.app.settings import Settings
from service.core.errors import ConfigError

logger = logging.getLogger("service")


def build_runner(settings: Settings, registry: Any) -> Any:
    """Wire the real parts together (used by ``run``, the demo and the integration tests)."""
    import httpx
    from confluent_kafka import Consumer, Producer

    from service.adapters.activecampaign import ActiveCampaignClient
    from service.adapters.apply import ContactApplier
    from service.adapters.bulk import BulkImporter
    from service.adapters.ledger_store import LedgerStore
    from service.adapters.lists import ListDirectory
    from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
    from service.app.logs import EmailHasher
    from service.core.codec import EventDecoder, SchemaRegistryClient, load_reader_schema
    from service.metrics import Metrics
    from service.pipeline.loop import Runner

    metrics = Metrics(registry)
    # Wall-clock time: replicas align their shares of the account budget on the same ticks.
    limiter = RateLimiter(
        settings.ac_rate_limit_per_second, clock=time.time, on_wait=metrics.ratelimit_wait.observe
    )
    transport = RateLimitedTransport(httpx.HTTPTransport(retries=0), limiter)
    http = httpx.Client(
        base_url=settings.ac_base_url + "/",
        transport=transport,
        timeout=httpx.Timeout(settings.ac_request_timeout_seconds),
        limits=httpx.Limits(max_connections=settings.ac_concurrency + 2),
    )
    client = ActiveCampaignClient(
        http,
        lambda: settings.current_token().reveal(),
        metrics,
        sender_url=settings.ac_list_sender_url,
        sender_reminder=settings.ac_list_sender_reminder,
    )
    lists = ListDirectory(client, create=settings.ac_create_lists)
    applier = ContactApplier(
        client,
        lists,
        settings.attribute_map,
        settings.field_map,
        clock=time.monotonic,
    )
    bulk = (
        BulkImporter(client, lists, settings.attribute_map, settings.field_map)
        if settings.ac_bulk_import
        else None
    )
    lookup = None
    if settings.schema_registry_url:
        registry_http = httpx.Client(timeout=10.0)

        def http_get(url: str) -> tuple[int, bytes]:
            response = registry_http.get(url)
            return response.status_code, response.content

        lookup = SchemaRegistryClient(settings.schema_registry_url, http_get)
    decoder = EventDecoder(load_reader_schema(logical_types=False), lookup)
    key = settings.email_hash_key.reveal().encode() if settings.email_hash_key else None
    hasher = EmailHasher(key)

    holder: dict[str, Runner] = {}

    def on_error(error: Any) -> None:
        if "runner" in holder:
            holder["runner"].on_kafka_error(error)

    consumer_cfg: dict[str, Any] = dict(settings.consumer_config())
    consumer_cfg["error_cb"] = on_error
    consumer = Consumer(consumer_cfg)
    producer = Producer(settings.producer_config())
    ledger = LedgerStore(settings.kafka_ledger_topic, producer, settings.consumer_config())
    runner = Runner(
        settings,
        consumer,
        producer,
        decoder,
        applier,
        limiter,
        metrics,
        hasher,
        rng=random.Random(),
        bulk=bulk,
        ledger=ledger,
    )
    holder["runner"] = runner
    return runner


def ensure_topics(settings: Settings) -> None:
    """Create the dead-letter topic and the compacted ledger topic when missing, with the source
    topic's partition count. A ledger with another partition count would break the rule that a
    replica owns the ledger of the partitions it consumes: that is a configuration error."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient(dict(settings.producer_config()))
    try:
        metadata = admin.list_topics(timeout=10)
    except Exception as exc:
        logger.warning("cannot list topics", extra={"error": str(exc)})
        return
    source = metadata.topics.get(settings.kafka_topic)
    partitions = len(source.partitions) if source is not None and source.partitions else 0
    ledger = metadata.topics.get(settings.kafka_ledger_topic)
    if ledger is not None and partitions and len(ledger.partitions) != partitions:
        raise ConfigError(
            "KAFKA_LEDGER_TOPIC",
            f"{settings.kafka_ledger_topic} has {len(ledger.partitions)} partitions, "
            f"the source topic {partitions}: they must be equal",
        )
    wanted = []
    if settings.kafka_dlq_topic not in metadata.topics:
        wanted.append(NewTopic(settings.kafka_dlq_topic, partitions or 1))
    if ledger is None:
        if not partitions:
            raise ConfigError(
                "KAFKA_TOPIC", f"{settings.kafka_topic} does not exist (the ledger copies its size)"
            )
        wanted.append(
            NewTopic(settings.kafka_ledger_topic, partitions, config={"cleanup.policy": "compact"})
        )
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted).items():
        try:
            future.result(timeout=10)
            logger.info("created topic", extra={"topic": topic})
        except Exception as exc:
            # Another replica may have created it a moment ago; ``check`` reports the rest.
            logger.warning("could not create topic", extra={"topic": topic, "error": str(exc)})
