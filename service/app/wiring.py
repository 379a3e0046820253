"""Wiring: the only place that builds real clients (Kafka, httpx, the schema registry) and hands
them to the pipeline. Used by ``run``, the demo and the integration tests."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.app.settings import Settings
from service.core.errors import ConfigError
from service.pipeline.loop import Loop

if TYPE_CHECKING:
    from service.app.preview import Preview
    from service.core.codec import EventDecoder

logger = logging.getLogger("service")

GC_QUIESCE_SECONDS = 0.1  # see RateLimiter.quiesce


def build_runner(settings: Settings, registry: Any, preview: Preview | None = None) -> Loop:
    """Wire the real parts together (used by ``run``, the demo and the integration tests).
    With ``preview`` (``run --dry-run``, settings from ``preview_settings``), the ports are a
    preview's: nothing is written to AC or Kafka (``service/app/preview.py``)."""
    import httpx
    from confluent_kafka import Consumer, Producer

    from service.adapters.ac_http import HttpDriver
    from service.adapters.executor import ThreadedExecutor
    from service.adapters.kafka import AckedProducer
    from service.adapters.kafka_readers import kafka_log_reader, record_scanner
    from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
    from service.app.logs import EmailHasher
    from service.app.runtime import Collector, MemoryTrimmer
    from service.clock import SystemClock
    from service.metrics import Metrics
    from service.pipeline.stages import Ports

    metrics = Metrics(registry, dry_run=preview is not None)
    clock = SystemClock()
    # Wall-clock time: replicas align their shares of the account budget on the same ticks.
    limiter = RateLimiter(
        settings.ac_rate_limit_per_second,
        guard=settings.ac_rate_guard_seconds,
        tools_every=settings.ac_tools_tick_every,
        clock=clock.wall,
        on_wait=metrics.ratelimit_wait.observe,
    )
    if preview is not None and not preview.exclusive and settings.ac_tools_tick_every:
        # As ``reconcile``: only the ticks a live deployment leaves for tools (its share is
        # untouched); the preview's settings never take a share of partitions' ticks.
        from service.core.budget import TOOLS

        limiter.share(frozenset({TOOLS}), 1)
    # The pool keeps httpx's default size (100 connections), well above the threads that send
    # (``AC_CONCURRENCY`` at most 64, plus learning and tools): a request waits for its rate
    # slot before it reaches the pool, and a wait for a connection after its slot would send
    # it late, bunched with the next slot's. (``httpx.Client(limits=)`` would not apply here
    # anyway: a client given its own transport leaves the transport's pool as it is.)
    transport = RateLimitedTransport(httpx.HTTPTransport(retries=0), limiter, clock.wall)
    http = httpx.Client(
        base_url=settings.ac_base_url + "/",
        transport=transport,
        timeout=httpx.Timeout(settings.ac_request_timeout_seconds),
        follow_redirects=False,
    )
    driver = HttpDriver(http, lambda: settings.current_token().reveal(), metrics, clock.monotonic)
    decoder = build_decoder(settings, clock.monotonic)
    key = settings.email_hash_key.reveal().encode() if settings.email_hash_key else None
    hasher = EmailHasher(key)

    holder: dict[str, Loop] = {}

    def on_error(error: Any) -> None:
        if "loop" in holder:
            holder["loop"].on_kafka_error(error)
        logger.warning("kafka error", extra={"error": error.str()})

    consumer_cfg: dict[str, Any] = settings.group_consumer_config()
    consumer_cfg["error_cb"] = on_error
    consumer = Consumer(consumer_cfg)
    # A dry run sends nothing to Kafka: not even a producer is built.
    producer: Any = Producer(settings.producer_config()) if preview is None else preview.kafka
    collector = Collector()
    trimmer = MemoryTrimmer()

    def housekeeping(now: float) -> None:
        # The scheduled full collection (``service/app/runtime.py``), between two iterations.
        # No request may be between its slot and the wire while it holds every thread.
        collected = collector.maybe_collect(now, lambda: limiter.quiesce(GC_QUIESCE_SECONDS))
        if collected is not None:
            found, pause = collected
            metrics.gc_pause.observe(pause)
            metrics.gc_unreachable.inc(found)
            logger.info(
                "garbage collected",
                extra={"unreachable": found, "pause_seconds": round(pause, 3)},
            )
        # After a collection at once: what it freed goes back too.
        trimmer.maybe_trim(now, force=collected is not None)

    readers = kafka_log_reader(settings.consumer_config())
    if preview is not None and not preview.ledger_exists:
        from service.adapters.preview import empty_log

        readers = empty_log  # the service never ran: an empty ledger, not created
    ports = Ports(
        consumer=consumer,
        producer=AckedProducer(producer),
        readers=readers,
        scanners=record_scanner(settings.consumer_config()),
        executor=ThreadedExecutor(settings.ac_concurrency, driver.send),
        requests=limiter,
        decoder=decoder,
        clock=clock,
        rng=random.Random(),
        housekeeping=housekeeping,
    )
    if preview is not None:
        ports = preview.ports(ports)
    loop = Loop(settings, ports, metrics, hasher)
    if preview is not None:
        preview.attach(loop)
    holder["loop"] = loop
    return loop


def build_decoder(settings: Settings, clock: Callable[[], float]) -> EventDecoder:
    """The record decoder the service uses: schemaless Avro, or Confluent wire format with the
    configured schema registry (``run`` and ``redrive``, which checks a record decodes before
    it puts it back)."""
    from service.adapters.schema_registry import SchemaRegistryLookup
    from service.core.codec import EventDecoder, load_reader_schema

    lookup = None
    if settings.schema_registry_url:
        user = password = None
        if settings.schema_registry_basic_auth_user_info is not None:
            user, _, password = settings.schema_registry_basic_auth_user_info.reveal().partition(
                ":"
            )
        lookup = SchemaRegistryLookup(
            settings.schema_registry_url,
            basic_auth_user=user,
            basic_auth_password=password,
            ca_location=settings.schema_registry_ca_location,
            cert_location=settings.schema_registry_cert_location,
            key_location=settings.schema_registry_key_location,
            timeout=settings.schema_registry_timeout_seconds,
        )
    return EventDecoder(load_reader_schema(logical_types=False), lookup, clock=clock)


def preview_start(settings: Settings, live_group: str) -> dict[int, int]:
    """Put the preview's group (``settings``) where the live group is: its committed offsets,
    or 0 (the beginning) for a partition it has none of. The preview then shows what the live
    service is about to do. Reads the live group's offsets, commits only the preview's (as a
    client outside the group: no member joins either group). Returns the offsets."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from service.app.logs import quiet_kafka_logger

    topic = settings.kafka_topic
    config = {**settings.consumer_config(), "logger": quiet_kafka_logger()}
    live = Consumer({**config, "group.id": live_group})
    try:
        partitions = sorted(live.list_topics(topic, timeout=10).topics[topic].partitions)
        committed = live.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        live.close()
    offsets = {tp.partition: max(0, tp.offset) for tp in committed}
    preview = Consumer(config)
    try:
        preview.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
    except KafkaException as exc:
        raise ConfigError(
            "KAFKA_PREVIEW_GROUP_ID",
            f"cannot set the offsets of {settings.kafka_group_id} (is another preview running "
            f"in it?): {settings.redact(str(exc))}",
        ) from None
    finally:
        preview.close()
    return offsets


def preview_topics(settings: Settings) -> bool:
    """``ensure_topics`` for a dry run, which creates nothing: the source topic must exist;
    True when the ledger topic does (it is read), False when the service never ran."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict(settings.producer_config()))
    try:
        metadata = admin.list_topics(timeout=10)
    except Exception as exc:
        logger.warning("cannot list topics", extra={"error": str(exc)})
        return True
    if settings.kafka_topic not in metadata.topics:
        raise ConfigError("KAFKA_TOPIC", f"{settings.kafka_topic} does not exist")
    return settings.kafka_ledger_topic in metadata.topics


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
