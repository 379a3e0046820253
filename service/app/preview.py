"""``run --dry-run`` (or ``AC_DRY_RUN=true``): the service's decisions on the topic, written
nowhere (README "Preview").

The pipeline runs unchanged on ports of its own (``Preview.ports``): a consumer group of its
own (``KAFKA_PREVIEW_GROUP_ID``, by default ``<KAFKA_GROUP_ID>.preview``: the live group's
offsets are never touched), AC calls whose writes the shadow answers (reads go to AC through
the real limiter: by default in the ticks kept for tools, so a live deployment's share is not
touched), and a producer that acknowledges the ledger's and the DLQ's records without sending
them (the ledger topic is read, to decide as the live service would). The confirmer's observer
(``Preview.recorded``/``parked``) pairs each decision with the write answered for it and feeds
the report.

The run previews the topic as it is when first read to its end: then every partition is
paused (``AT_END``: records published later are left for a later run, so a busy topic ends
too), the work in hand is finished, and the run stops and prints the report (``--json``: as
JSON) on stdout. ``--follow``: it keeps reading until SIGTERM. While it runs, a
``dry run report`` log line every ``LOG_EVERY_SECONDS`` gives the counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from service.adapters.kafka import AckedProducer
from service.adapters.preview import DiscardingProducer, EndWatch, PreviewExecutor, SharedShadow
from service.app.audit import printable, quoted
from service.app.settings import Settings
from service.core.coalesce import PendingChange
from service.core.errors import ConfigError
from service.core.ledger import Known
from service.core.preview_report import CATEGORIES, PreviewReport, classify
from service.pipeline.loop import Loop
from service.pipeline.stages import Ports

logger = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0
AT_END = "preview_end"  # the pause of a partition the preview has read to its end
WORDS = {
    "subscribe": "would subscribe",
    "unsubscribe": "would unsubscribe",
    "keep_opt_out": "would keep an opt-out",
    "skip": "nothing to do (skip)",
    "park": "would park (DLQ)",
}


def preview_settings(settings: Settings) -> Settings:
    """What a preview runs with: its own consumer group, and a request budget that is not
    shared by partitions (the preview owns none of the live deployment's ticks: see
    ``wiring.build_runner``)."""
    return dataclasses.replace(
        settings, kafka_group_id=settings.preview_group_id, ac_rate_share="none", dry_run=True
    )


def preview_problems(settings: Settings, *, exclusive: bool) -> list[ConfigError]:
    """Beside a live deployment a preview sends only in the ticks kept for tools: without
    them (``AC_TOOLS_TICK_EVERY=0``) it has no budget that is not the live one's."""
    if exclusive or settings.ac_tools_tick_every:
        return []
    return [
        ConfigError(
            "AC_TOOLS_TICK_EVERY",
            "is 0: a dry run beside a live deployment sends in the ticks kept for tools; "
            'use --exclusive only when no live deployment runs (README "Preview")',
        )
    ]


class Preview:
    def __init__(
        self, *, live_group: str = "", follow: bool = False, exclusive: bool = False
    ) -> None:
        self.live_group = live_group  # the preview starts where this group is
        self.start_offsets: dict[int, int] = {}
        self.follow = follow
        self.exclusive = exclusive  # every tick of the budget (no live deployment runs)
        self.ledger_exists = True
        self.shadow = SharedShadow()
        self.report = PreviewReport()
        self.kafka = DiscardingProducer()
        self.watch: EndWatch | None = None
        self.loop: Loop | None = None
        self.started: float | None = None
        self.logged_at = 0.0
        self.at_end = False  # every partition read to its end once, and paused there
        self.done = False

    # ---- wiring ----------------------------------------------------------------------------

    def ports(self, ports: Ports) -> Ports:
        """The live ports, turned into a preview's."""
        self.watch = EndWatch(ports.consumer)
        before = ports.housekeeping

        def housekeeping(now: float) -> None:
            before(now)
            self.housekeeping(now)

        return dataclasses.replace(
            ports,
            consumer=self.watch,
            producer=AckedProducer(self.kafka, sleep=ports.producer.sleep),
            executor=PreviewExecutor(ports.executor, self.shadow),
            housekeeping=housekeeping,
        )

    def attach(self, loop: Loop) -> None:
        self.loop = loop
        loop.confirm.observer = self

    # ---- the confirmer's observer --------------------------------------------------------

    def recorded(
        self,
        change: PendingChange,
        known: Known | None,
        list_id: str | None,
        contact_id: str | None,
    ) -> None:
        wrote = self.shadow.wrote(change.email, contact_id, list_id)
        category = classify(change.plan, change.event.action.status, known, wrote)
        email_hash = self._hash(change.email)
        with self.shadow.lock:
            self.report.add(change.target.label(), category, email_hash)

    def parked(self, change: PendingChange | None, reason: str, key: bytes | None) -> None:
        label: str | None = None
        email_hash: str | None = None
        if change is not None:
            label, email_hash = change.target.label(), self._hash(change.email)
        elif key:
            email_hash = self._hash(key.decode("utf-8", "replace"))
        with self.shadow.lock:
            self.report.park(label, reason, email_hash)

    def _hash(self, email: str) -> str:
        assert self.loop is not None
        return self.loop.confirm.hasher(email)

    # ---- the run ---------------------------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        if self.started is None:
            self.started = self.logged_at = now
        if now - self.logged_at >= LOG_EVERY_SECONDS:
            self.logged_at = now
            self.log()
        loop = self.loop
        if self.follow or self.done or loop is None:
            return
        if not self.at_end and self.read_to_end():
            self.at_end = True
            for partition in loop.ownership.assigned:
                loop.pauses.hold(partition, AT_END)
            logger.info("dry run: every partition read to its end; finishing the work in hand")
        if self.at_end and loop.idle():
            self.done = True
            logger.info("dry run: done; stopping")
            loop.request_stop()

    def read_to_end(self) -> bool:
        """Every assigned partition (but those the dead-letter breaker stopped) restored and
        read to its end, no record held back."""
        loop, watch = self.loop, self.watch
        if loop is None or watch is None:
            return False
        assigned = loop.ownership.assigned
        stopped = loop.source.breaker.tripped
        reading = sorted(p for p in assigned if p not in stopped)
        held = sum(len(q) for p, q in loop.source.held.items() if p not in stopped)
        return (
            bool(assigned)
            and not loop.ownership.restoring
            and held == 0
            and watch.read_to_end(reading)
        )

    def summary(self) -> dict[str, Any]:
        with self.shadow.lock:
            data = self.report.summary(self.shadow.shadow)
            totals = self.report.totals()
        loop = self.loop
        data["dry_run"] = True
        data["group"] = loop.settings.kafka_group_id if loop else None
        data["started_where"] = {
            "group": self.live_group,
            "offsets": {str(p): o for p, o in sorted(self.start_offsets.items())},
        }
        data["records_read"] = self.watch.records if self.watch else 0
        data["totals"] = totals
        data["not_written"] = {
            "ledger_records": self.kafka.produced.get(loop.settings.kafka_ledger_topic, 0)
            if loop
            else 0,
            "dead_letters": self.kafka.produced.get(loop.settings.kafka_dlq_topic, 0)
            if loop
            else 0,
        }
        data["dlq_breaker_open_partitions"] = sorted(loop.source.breaker.tripped) if loop else []
        return data

    def log(self) -> None:
        data = self.summary()
        logger.info(
            "dry run report",
            extra={
                "records_read": data["records_read"],
                "totals": data["totals"],
                "lists": {
                    name: {c: entry[c] for c in CATEGORIES} for name, entry in data["lists"].items()
                },
                "records_parked": data["records_parked"]["total"],
                "writes_not_sent": data["writes_not_sent"],
                "reads_sent": data["reads_sent"],
            },
        )


def render(data: dict[str, Any]) -> list[str]:
    """The report for a terminal (names escaped: they come from events)."""
    lines = [
        "DRY RUN: nothing was written to ActiveCampaign, the ledger or the dead-letter topic, "
        "and no offset of the live consumer group was committed.",
        f"Read {data['records_read']} record(s) as consumer group {quoted(data['group'])}, "
        f"from where the live group {quoted(data['started_where']['group'])} was.",
    ]
    writes = data["writes_not_sent"]
    if writes:
        parts = [f"{n} {printable(what)}" for what, n in writes.items()]
        lines.append(
            f"ActiveCampaign writes not sent: {', '.join(parts)} "
            f"({data['contacts_in_imports']} contact(s) in imports)."
        )
    else:
        lines.append("ActiveCampaign writes not sent: none.")
    reads = data["reads_sent"]
    lines.append(
        "ActiveCampaign reads sent: "
        + (", ".join(f"{n} {what}" for what, n in reads.items()) if reads else "none")
        + "."
    )
    for name, entry in data["lists"].items():
        created = " (would be created)" if entry["created"] else ""
        lines.append(f"list {quoted(name)}{created}:")
        for category in CATEGORIES:
            sample = entry["samples"].get(category)
            line = f"  {WORDS[category]:<24}{entry[category]:>8}"
            if category == "park" and entry["parked_by_reason"]:
                reasons = ", ".join(f"{r} {n}" for r, n in entry["parked_by_reason"].items())
                line += f"  ({reasons})"
            if sample:
                line += f"  e.g. {' '.join(sample)}"
            lines.append(line)
    parked = data["records_parked"]
    if parked["total"]:
        reasons = ", ".join(f"{r} {n}" for r, n in parked["by_reason"].items())
        sample = f"  e.g. {' '.join(parked['samples'])}" if parked["samples"] else ""
        lines.append(
            f"records that would be parked before any list: {parked['total']} ({reasons}){sample}"
        )
    stopped = data["dlq_breaker_open_partitions"]
    if stopped:
        lines.append(
            "partitions the dead-letter breaker would stop: " + ", ".join(map(str, stopped))
        )
    totals = data["totals"]
    lines.append("total: " + ", ".join(f"{c} {totals[c]}" for c in CATEGORIES))
    lines.append("Emails are shown as email_hash (EMAIL_HASH_KEY), as in the logs.")
    return lines
