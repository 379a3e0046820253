"""The dry run's report (``run --dry-run``): what the changes a preview read would do. Pure.

``PreviewReport`` is the aggregation the operator reads: per list, how many changes would
subscribe, unsubscribe, keep a person's opt-out, need nothing (skip), or be parked, with a few
hashed emails each; the records parked before any list was known (decoding, validation); the
writes that would have been sent and the reads that were.

Each change the pipeline recorded is paired with the write the shadow (``preview.Shadow``)
answered for it, if any (``Shadow.wrote``), and ``classify`` names what it amounts to: a write
is a subscribe or an unsubscribe; no write is a kept opt-out or a skip (a parked change is
counted by ``park``). Every category is in ``CATEGORIES``; a list keeps at most ``SAMPLE_SIZE``
hashed emails per category.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from service.core.ledger import Known, Plan
from service.core.preview import Shadow, Wrote

SUBSCRIBE, UNSUBSCRIBE, KEEP_OPT_OUT, SKIP, PARK = (
    "subscribe",
    "unsubscribe",
    "keep_opt_out",
    "skip",
    "park",
)
CATEGORIES = (SUBSCRIBE, UNSUBSCRIBE, KEEP_OPT_OUT, SKIP, PARK)
SAMPLE_SIZE = 5


def classify(plan: Plan, action_status: int, known: Known | None, wrote: Wrote | None) -> str:
    """What one recorded change amounts to: the write answered for it, or else what the
    pipeline decided without writing."""
    if wrote is not None:
        return SUBSCRIBE if wrote.status == 1 else UNSUBSCRIBE
    if plan is Plan.CONSENT_KEPT or (
        known is not None and known.status == 2 and action_status == 1
    ):
        return KEEP_OPT_OUT
    return SKIP


@dataclass
class ListPreview:
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    parked: Counter[str] = field(default_factory=Counter)  # by dlq.reason


@dataclass
class PreviewReport:
    lists: dict[str, ListPreview] = field(default_factory=dict)
    records_parked: Counter[str] = field(default_factory=Counter)  # no list known: by reason
    record_samples: list[str] = field(default_factory=list)

    def add(self, list_label: str, category: str, email_hash: str) -> None:
        entry = self.lists.setdefault(list_label, ListPreview())
        entry.counts[category] += 1
        sample = entry.samples.setdefault(category, [])
        if len(sample) < SAMPLE_SIZE and email_hash not in sample:
            sample.append(email_hash)

    def park(self, list_label: str | None, reason: str, email_hash: str | None) -> None:
        if list_label is not None:
            self.lists.setdefault(list_label, ListPreview()).parked[reason] += 1
            self.add(list_label, PARK, email_hash or "")
            return
        self.records_parked[reason] += 1
        if email_hash and len(self.record_samples) < SAMPLE_SIZE:
            self.record_samples.append(email_hash)

    def summary(self, shadow: Shadow) -> dict[str, Any]:
        """The whole report as JSON-ready data (``shadow``: the writes and reads)."""
        created = set(shadow.created)
        return {
            "lists": {
                name: {
                    **{c: entry.counts.get(c, 0) for c in CATEGORIES},
                    "created": name in created,
                    "parked_by_reason": dict(sorted(entry.parked.items())),
                    "samples": {c: entry.samples[c] for c in CATEGORIES if entry.samples.get(c)},
                }
                for name, entry in sorted(self.lists.items())
            },
            "records_parked": {
                "total": sum(self.records_parked.values()),
                "by_reason": dict(sorted(self.records_parked.items())),
                "samples": list(self.record_samples),
            },
            "lists_created": sorted(created),
            "writes_not_sent": dict(sorted(shadow.writes.items())),
            "contacts_in_imports": shadow.imported_contacts,
            "reads_sent": dict(sorted(shadow.reads.items())),
        }

    def totals(self) -> dict[str, int]:
        total = Counter({c: 0 for c in CATEGORIES})
        for entry in self.lists.values():
            total.update(entry.counts)
        total[PARK] += sum(self.records_parked.values())
        return dict(total)
