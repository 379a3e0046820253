"""Every metric, defined once, on an injected registry (tests use a fresh one each).

Labels are bounded sets only: topic, partition, endpoint (route template), method, code (HTTP
status or ``timeout``/``conn_error``), reason and outcome (enumerated), action, kind. Never an
email, a list name from user data, an event id or the token.
"""

from __future__ import annotations

import confluent_kafka
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import __version__

DLQ_REASONS = (
    "undecodable",
    "bad_magic",
    "unknown_schema",
    "incompatible_schema",
    "missing_field",
    "invalid_email",
    "no_list_name",
    "invalid_field",
    "list_missing",
    "list_limit",
    "ac_rejected",
    "retries_exhausted",
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
AGE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 14400)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, dry_run: bool = False) -> None:
        self.registry = registry
        r = registry
        self.events_consumed = Counter(
            "ac_sync_events_consumed",
            "Records polled from Kafka, by outcome.",
            ["topic", "outcome"],
            registry=r,
        )
        self.changes_applied = Counter(
            "ac_sync_changes_applied",
            "Membership changes confirmed by ActiveCampaign.",
            ["action"],
            registry=r,
        )
        self.events_coalesced = Counter(
            "ac_sync_events_coalesced",
            "Events superseded by a later event for the same email and list before sending.",
            registry=r,
        )
        self.dlq_records = Counter(
            "ac_sync_dlq_records",
            "Records parked in the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.ac_requests = Counter(
            "ac_sync_ac_requests",
            "ActiveCampaign HTTP attempts, by endpoint and status.",
            ["endpoint", "method", "code"],
            registry=r,
        )
        self.ac_request_duration = Histogram(
            "ac_sync_ac_request_duration_seconds",
            "ActiveCampaign request latency.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ac_rate_limited = Counter(
            "ac_sync_ac_rate_limited",
            "429 (and bulk-import rate-limit) answers received.",
            registry=r,
        )
        self.ac_retries = Counter(
            "ac_sync_ac_retries",
            "Changes scheduled for another attempt, by reason.",
            ["reason"],
            registry=r,
        )
        self.imports = Counter(
            "ac_sync_imports",
            "Bulk imports by outcome: prepared, submitted, queued, completed, rate_limited, "
            "failed, abandoned (still processing at AC after IMPORT_GIVE_UP_SECONDS: resent).",
            ["outcome"],
            registry=r,
        )
        self.import_contacts = Counter(
            "ac_sync_import_contacts", "Contacts sent in queued bulk imports.", registry=r
        )
        self.imports_outstanding = Gauge(
            "ac_sync_imports_outstanding",
            "Bulk imports queued at AC, not yet completed.",
            registry=r,
        )
        self.import_budget_left = Gauge(
            "ac_sync_import_budget_left",
            "Imports this replica may still start in AC's current minute (what its partitions' "
            "share of the 98-a-minute import budget has left).",
            registry=r,
        )
        self.changes_skipped = Counter(
            "ac_sync_changes_skipped",
            "Changes that needed no AC request: already_applied (the ledger held the state: "
            "replays, duplicates), stale (older by occurred_at than the event the ledger applied, or "
            "than the pending one it would replace, by more than STALE_EVENT_TOLERANCE_SECONDS).",
            ["reason"],
            registry=r,
        )
        self.consent_kept = Counter(
            "ac_sync_consent_kept",
            "ENTERED changes left unsubscribed because the person had opted out themselves.",
            registry=r,
        )
        self.ledger_writes = Counter(
            "ac_sync_ledger_writes",
            "Ledger records produced (one per email per applied batch of its changes).",
            registry=r,
        )
        self.ledger_write_failures = Counter(
            "ac_sync_ledger_write_failures",
            "Ledger deliveries the broker did not acknowledge (each is retried).",
            registry=r,
        )
        self.ledger_emails = Gauge(
            "ac_sync_ledger_emails",
            "Emails held in the in-memory ledger of the assigned partitions.",
            registry=r,
        )
        self.ledger_restore_seconds = Histogram(
            "ac_sync_ledger_restore_seconds",
            "Time to load the ledger of newly assigned partitions.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.ledger_restored_records = Counter(
            "ac_sync_ledger_restored_records",
            "Ledger records read while restoring assigned partitions.",
            registry=r,
        )
        self.ratelimit_wait = Histogram(
            "ac_sync_ratelimit_wait_seconds",
            "Time a request waited for a limiter slot.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.ratelimit_queue_depth = Gauge(
            "ac_sync_ratelimit_queue_depth",
            "Requests waiting for a limiter slot.",
            registry=r,
        )
        self.ratelimit_rate = Gauge(
            "ac_sync_ratelimit_rate_per_second",
            "Effective request rate of this replica.",
            registry=r,
        )
        self.ratelimit_paused = Gauge(
            "ac_sync_ratelimit_paused",
            "1 while all AC traffic waits for a Retry-After.",
            registry=r,
        )
        self.changes_pending = Gauge(
            "ac_sync_changes_pending",
            "Coalesced changes waiting to be sent.",
            registry=r,
        )
        self.changes_inflight = Gauge(
            "ac_sync_changes_inflight",
            "Changes being sent to ActiveCampaign now.",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "ac_sync_consumer_lag",
            "Records between the committed offset and the partition end.",
            ["topic", "partition"],
            registry=r,
        )
        self.committed_offset = Gauge(
            "ac_sync_committed_offset",
            "Last committed offset.",
            ["topic", "partition"],
            registry=r,
        )
        self.last_commit_timestamp = Gauge(
            "ac_sync_last_commit_timestamp_seconds",
            "Wall time of the last commit that advanced the partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.commit_failures = Counter(
            "ac_sync_commit_failures",
            "Failed offset commits (the reason is logged).",
            registry=r,
        )
        self.commit_duration = Histogram(
            "ac_sync_commit_duration_seconds",
            "Offset commit latency.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_to_applied = Histogram(
            "ac_sync_event_to_applied_seconds",
            "From the event's occurred_at to ActiveCampaign confirming the change.",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "ac_sync_gc_pause_seconds",
            "Scheduled full garbage collections and how long each held the loop (see runtime.py).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gc_unreachable = Counter(
            "ac_sync_gc_unreachable_objects",
            "Objects in reference cycles found by the scheduled collections.",
            registry=r,
        )
        self.rebalances = Counter(
            "ac_sync_rebalances",
            "Group rebalance callbacks, by kind.",
            ["kind"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "ac_sync_assigned_partitions",
            "Partitions currently assigned.",
            registry=r,
        )
        self.dlq_breaker_open = Gauge(
            "ac_sync_dlq_breaker_open_partitions",
            "Partitions the dead-letter breaker holds paused until a restart: more than "
            "DLQ_BREAKER_MAX_SHARE of their last DLQ_BREAKER_WINDOW records were poison "
            "(/readyz names them).",
            registry=r,
        )
        self.paused_partitions = Gauge(
            "ac_sync_paused_partitions",
            "Partitions paused for back-pressure.",
            registry=r,
        )
        self.heartbeat = Gauge(
            "ac_sync_main_loop_heartbeat_timestamp_seconds",
            "Wall time of the last main-loop iteration.",
            registry=r,
        )
        self.auth_rejected = Gauge(
            "ac_sync_auth_rejected",
            "1 while ActiveCampaign refuses the token.",
            registry=r,
        )
        self.ready = Gauge("ac_sync_ready", "1 when the readiness probe passes.", registry=r)
        self.inflight_uncommitted = Gauge(
            "ac_sync_inflight_uncommitted",
            "Polled offsets not yet committable (work repeated after a crash).",
            ["topic", "partition"],
            registry=r,
        )
        self.build_info = Gauge(
            "ac_sync_build_info",
            "Build metadata; dry_run is true for a preview (``run --dry-run``), which writes "
            "nothing to ActiveCampaign or Kafka.",
            ["version", "librdkafka_version", "dry_run"],
            registry=r,
        )
        self.build_info.labels(
            __version__, confluent_kafka.libversion()[0], "true" if dry_run else "false"
        ).set(1)
        self._zeroes()

    def _zeroes(self) -> None:
        """Every bounded label value exists from the start, so rates and alerts see a 0, not
        nothing."""
        for reason in DLQ_REASONS:
            self.dlq_records.labels(reason)
        for action in ("entered", "exited"):
            self.changes_applied.labels(action)
        for reason in ("already_applied", "stale"):
            self.changes_skipped.labels(reason)
        for reason in ("transient", "rate_limited"):
            self.ac_retries.labels(reason)
        for kind in ("assign", "revoke", "lost"):
            self.rebalances.labels(kind)
        for outcome in (
            "prepared",
            "submitted",
            "queued",
            "completed",
            "rate_limited",
            "failed",
            "abandoned",
        ):
            self.imports.labels(outcome)
