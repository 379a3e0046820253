"""``forget``: what the ledger holds of some emails, and what to write so that it holds nothing.
Pure: the shell (``service/app/forget.py``) reads the ledger topic and writes.

The ledger (``service/adapters/ledger_store.py``) keys an email's entry by the normalised email,
in the partition of the source records that produced it (the email's partition: producers key
by the normalised email, but the partitioner is theirs, so the shell finds the partition by
reading, never by hashing). Its other keys are ``import-budget`` (no emails) and
``import/<id>``, an import that may still land, whose value lists the emails it carries.

Compaction keeps the latest value per (partition, key). So the email is gone from the ledger
once, per partition, the latest value of its key is a tombstone (a null value) and no intent's
latest value names it: ``plan_erasure`` says which tombstones and which intent rewrites that
takes. A tombstone is written only where an entry is live: a tombstone's key is the email
itself, kept until compaction drops it (``delete.retention.ms``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.core.ledger import INTENT_PREFIX


def latest_values(
    records: Iterable[tuple[int, bytes, bytes | None]], wanted: Callable[[str], bool]
) -> dict[tuple[int, str], bytes | None]:
    """Last write wins per (partition, key), as compaction keeps it, for the keys ``wanted``."""
    found: dict[tuple[int, str], bytes | None] = {}
    for partition, key_bytes, value in records:
        key = key_bytes.decode("utf-8", "replace")
        if wanted(key):
            found[(partition, key)] = value
    return found


@dataclass(frozen=True)
class IntentRewrite:
    """An intent that names some of the emails: written again without them (the import stays
    known to the next owner, which waits for it; it just no longer settles those emails)."""

    emails: tuple[str, ...]  # the targets it named
    value: bytes  # its value without them


@dataclass(frozen=True)
class Erasure:
    """What to write: a tombstone per (email, partition) with a live entry, and the intents
    to rewrite."""

    tombstones: Mapping[str, tuple[int, ...]]  # email -> partitions, sorted
    intents: Mapping[tuple[int, str], IntentRewrite]  # (partition, intent key) -> rewrite

    def partitions_of(self, email: str) -> tuple[int, ...]:
        return self.tombstones.get(email, ())

    def intents_naming(self, email: str) -> int:
        return sum(1 for rewrite in self.intents.values() if email in rewrite.emails)

    def writes(self) -> list[tuple[int, str, bytes | None]]:
        """(partition, key, value) to produce: tombstones, then intent rewrites."""
        found: list[tuple[int, str, bytes | None]] = [
            (partition, email, None)
            for email, partitions in sorted(self.tombstones.items())
            for partition in partitions
        ]
        found += [(p, key, r.value) for (p, key), r in sorted(self.intents.items())]
        return found


def plan_erasure(
    latest: Mapping[tuple[int, str], bytes | None],
    emails: Collection[str],
    intent_emails: Callable[[bytes], Sequence[str]],
    without: Callable[[bytes, frozenset[str]], bytes],
) -> Erasure:
    """``emails`` are normalised. ``intent_emails``: the emails an intent's value lists
    (``ValueError`` for an unreadable one: left alone, it names nobody we can tell);
    ``without``: that value with some emails removed."""
    targets = frozenset(emails)
    tombstones: dict[str, list[int]] = {}
    intents: dict[tuple[int, str], IntentRewrite] = {}
    for (partition, key), value in sorted(latest.items()):
        if value is None:
            continue
        if key in targets:
            tombstones.setdefault(key, []).append(partition)
        elif key.startswith(INTENT_PREFIX):
            try:
                named = frozenset(intent_emails(value)) & targets
            except ValueError:
                continue
            if named:
                intents[(partition, key)] = IntentRewrite(
                    tuple(sorted(named)), without(value, named)
                )
    return Erasure({e: tuple(p) for e, p in tombstones.items()}, intents)
