"""The ledger's Kafka shell: restore partitions into ``CompactIndex``, write entries
(``ledger_reads.py`` reads the whole ledger for ``explain`` and ``reconcile``).

Topic: compacted, one partition per source partition; a ledger record goes to the partition of
the source record that produced it, so the replica that owns a source partition owns its ledger.
Three kinds of keys: an email (its ``LedgerEntry``), ``import-budget`` (the partition's import
history, ``ImportBudget.history``) and ``import/<id>`` (an import that may still land: written
before the import is sent, deleted by a tombstone once its outcome is recorded; see
``service/pipeline/imports.py``).

Writes, per key, land in order and the latest always wins:
- every write carries the whole current value (an entry is cumulative), so a write that failed
  is never sent again once a later write of the same key is on its way: the later one covers
  it, and the callbacks of both run on the later one's ack. Only the latest value is resent;
- the producer is idempotent (per-partition order, no duplicates from librdkafka's retries);
- a partition handed over waits (``flush``) for its writes on the wire, and what was never sent
  is purged, so nothing of ours lands after the new owner restored;
- restore reads every record and keeps, per list, the state of the latest source record
  (``newest``); when that differs from the last record in the log (a write that landed after
  a newer one), it writes the merged entry again, so compaction keeps the right one.
Restore is incremental (``restore_step``, a bounded slice per loop turn): a big ledger never
holds the loop, and a partition's records wait until its ledger is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.adapters.kafka import AckedProducer, LogReader, LogReaderFactory
from service.core.ledger import BUDGET_KEY, INTENT_PREFIX, LedgerEntry, newest
from service.core.ledger_codec import LedgerCodec
from service.core.ledger_index import CompactIndex

logger = logging.getLogger(__name__)

RESTORE_BATCH = 5000


def encode_budget(charges: list[tuple[float, float]]) -> bytes:
    return json.dumps({"imports": [[round(t, 3), n] for t, n in charges]}).encode()


def decode_budget(raw: bytes) -> list[tuple[float, float]]:
    """(time, imports) pairs; ``ValueError`` for anything else."""
    try:
        charges = json.loads(raw)["imports"]
        decoded = [(float(t), float(n)) for t, n in charges]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not an import-budget record: {exc}") from None
    if not all(math.isfinite(t) and math.isfinite(n) and n >= 0 for t, n in decoded):
        raise ValueError("not an import-budget record: bad numbers")
    return decoded


@dataclass(frozen=True)
class Intent:
    """An import that may land in AC: the emails of one partition it carries."""

    intent_id: str
    batch_id: str | None
    emails: tuple[str, ...]
    submitted_at: float  # wall clock

    def encode(self) -> bytes:
        return json.dumps(
            {"batch": self.batch_id, "emails": list(self.emails), "at": self.submitted_at}
        ).encode()

    @classmethod
    def decode(cls, intent_id: str, raw: bytes) -> Intent:
        try:
            data = json.loads(raw)
            batch = data.get("batch")
            emails = tuple(str(e) for e in data["emails"])
            at = float(data["at"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an import intent: {exc}") from None
        if batch is not None and not isinstance(batch, str):
            raise ValueError("not an import intent: batch")
        return cls(intent_id, batch, emails, at)


@dataclass
class RestoreStats:
    partitions: list[int]
    records: int
    emails: int
    seconds: float
    repaired: int = 0


@dataclass
class _Key:
    """One key's writes in flight: sequence numbers, the latest value, callbacks waiting."""

    value: bytes | None = None
    sent: int = 0
    acked: int = 0
    waiting: list[tuple[int, Callable[[], None]]] = field(default_factory=list)


@dataclass
class _Restore:
    partitions: list[int]
    reader: LogReader
    started: float
    raw: dict[int, dict[str, bytes | None]] = field(default_factory=dict)  # last in log
    merged: dict[int, dict[str, LedgerEntry]] = field(default_factory=dict)  # seen twice+
    records: int = 0


class LedgerStore:
    def __init__(
        self,
        topic: str,
        acked: AckedProducer,
        readers: LogReaderFactory,
        *,
        codec: LedgerCodec | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.topic = topic
        self.codec = codec or LedgerCodec()
        self.index = CompactIndex()
        self._acked = acked
        self._readers = readers
        self._clock = clock
        self._on_failure = on_failure
        self._keys: dict[tuple[int, str], _Key] = {}
        self._restore: _Restore | None = None
        # Found by the last restore of each partition (absent: none written).
        self.budgets: dict[int, list[tuple[float, float]]] = {}
        self.intents: dict[int, list[Intent]] = {}

    # ---- restore ---------------------------------------------------------------------------

    @property
    def restoring(self) -> list[int]:
        return list(self._restore.partitions) if self._restore else []

    def start_restore(self, partitions: Sequence[int]) -> None:
        """Begin loading ``partitions`` (replacing what the index holds for them). A restore
        already running is restarted with the union (a rebalance may add partitions)."""
        wanted = sorted(set(partitions) | set(self.restoring))
        self.cancel_restore()
        if wanted:
            self._restore = _Restore(wanted, self._readers(self.topic, wanted), self._clock())
            for partition in wanted:
                self._restore.raw[partition] = {}
                self._restore.merged[partition] = {}

    def cancel_restore(self, partitions: set[int] | None = None) -> None:
        """Stop restoring (``partitions`` only: the rest restart from the beginning)."""
        job, self._restore = self._restore, None
        if job is None:
            return
        job.reader.close()
        if partitions is not None:
            rest = [p for p in job.partitions if p not in partitions]
            if rest:
                self.start_restore(rest)

    def restore_step(self, seconds: float) -> RestoreStats | None:
        """Read for up to ``seconds``; when every restoring partition reached its end, load
        them into the index and return what was read (else None)."""
        job = self._restore
        if job is None:
            return None
        deadline = self._clock() + seconds
        while not job.reader.done():
            for partition, key_bytes, value in job.reader.read(RESTORE_BATCH, 0.05):
                job.records += 1
                self._absorb(job, partition, key_bytes.decode("utf-8", "replace"), value)
            if self._clock() >= deadline:
                return None
        self._restore = None
        job.reader.close()
        return self._finish(job)

    def _absorb(self, job: _Restore, partition: int, key: str, value: bytes | None) -> None:
        raw = job.raw.setdefault(partition, {})
        merged = job.merged.setdefault(partition, {})
        if "@" not in key or value is None:
            raw[key] = value  # a tombstone, the budget or an intent: the last one wins
            merged.pop(key, None)
            return
        previous = merged.get(key)
        if previous is None and raw.get(key) is not None:
            previous = self._decode(raw[key])  # seen twice: merge from now on
        raw[key] = value
        if previous is not None:
            entry = self._decode(value)
            if entry is not None:
                merged[key] = newest(previous, entry)

    def _decode(self, raw: bytes | None) -> LedgerEntry | None:
        if raw is None:
            return None
        try:
            return self.codec.decode(raw)
        except ValueError as exc:
            logger.warning("unreadable ledger record ignored", extra={"error": str(exc)})
            return None

    def _finish(self, job: _Restore) -> RestoreStats:
        emails = repaired = 0
        for partition in job.partitions:
            raw = job.raw.pop(partition, {})
            merged = job.merged.pop(partition, {})
            budget = raw.pop(BUDGET_KEY, None)
            self.budgets.pop(partition, None)
            if budget is not None:
                try:
                    self.budgets[partition] = decode_budget(budget)
                except ValueError as exc:
                    # Written by us, so unexpected; the cost of ignoring it is at most one
                    # "Rate limit exceeded." from AC (back-pressure), never a lost change.
                    logger.warning(
                        "unreadable import-budget record ignored",
                        extra={"partition": partition, "error": str(exc)},
                    )
            intents: list[Intent] = []
            packed: dict[str, bytes] = {}
            for key, value in raw.items():
                if value is None:
                    continue
                if key.startswith(INTENT_PREFIX):
                    try:
                        intents.append(Intent.decode(key.removeprefix(INTENT_PREFIX), value))
                    except ValueError as exc:
                        logger.warning(
                            "unreadable import intent ignored", extra={"error": str(exc)}
                        )
                    continue
                if "@" not in key:
                    continue
                entry = merged.get(key)
                last = self._decode(value)
                if entry is None:
                    entry = last
                if entry is None:
                    continue
                packed[key] = self.index.pack(entry)
                if entry != last:
                    repaired += 1
                    self._write(partition, key, self.codec.encode(entry), lambda: None)
            self.index.replace(partition, packed)
            self.intents[partition] = intents
            emails += len(packed)
        if repaired:
            logger.warning(
                "ledger records older than an earlier one were last in the log; rewritten",
                extra={"repaired": repaired},
            )
        return RestoreStats(
            list(job.partitions), job.records, emails, self._clock() - job.started, repaired
        )

    def forget(self, partitions: set[int]) -> None:
        """Drop what is held for ``partitions`` (handed over): entries, restore, callbacks."""
        if self._restore is not None and set(self._restore.partitions) & partitions:
            self.cancel_restore(partitions)
        self.index.forget(partitions)
        for key in [k for k in self._keys if k[0] in partitions]:
            del self._keys[key]
        for partition in partitions:
            self.budgets.pop(partition, None)
            self.intents.pop(partition, None)

    def get(self, partition: int, email: str) -> LedgerEntry | None:
        return self.index.get(partition, email)

    # ---- writes ----------------------------------------------------------------------------

    def write(
        self, partition: int, email: str, entry: LedgerEntry, on_written: Callable[[], None]
    ) -> None:
        """Record ``entry`` now (later decisions see it) and on the topic; ``on_written`` runs
        on the broker's ack of this write or of a later one of the same email."""
        self.index.put(partition, email, entry)
        self._write(partition, email, self.codec.encode(entry), on_written)

    def write_budget(self, partition: int, charges: list[tuple[float, float]]) -> None:
        """Record the partition's import-budget history for its next owner."""
        self._write(partition, BUDGET_KEY, encode_budget(charges), lambda: None)

    def write_intent(self, partition: int, intent: Intent, on_written: Callable[[], None]) -> None:
        self._write(partition, INTENT_PREFIX + intent.intent_id, intent.encode(), on_written)

    def delete_intent(self, partition: int, intent_id: str) -> None:
        self._write(partition, INTENT_PREFIX + intent_id, None, lambda: None)

    def when_written(self, partition: int, email: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every write of ``email`` made so far is on the broker (now,
        if none is in flight): a decision taken from the index is only as durable as the
        writes the index already shows."""
        state = self._keys.get((partition, email))
        if state is None or state.acked >= state.sent:
            callback()
        else:
            state.waiting.append((state.sent, callback))

    def pending_writes(self, partitions: set[int]) -> int:
        return sum(1 for (p, _), k in self._keys.items() if p in partitions and k.waiting)

    def _write(
        self, partition: int, key: str, value: bytes | None, on_written: Callable[[], None]
    ) -> None:
        state = self._keys.setdefault((partition, key), _Key())
        state.value = value
        state.sent += 1
        state.waiting.append((state.sent, on_written))
        self._produce(partition, key, state, state.sent)

    def _produce(self, partition: int, key: str, state: _Key, seq: int) -> None:
        def acked() -> None:
            if self._keys.get((partition, key)) is not state:
                return  # handed over meanwhile
            state.acked = max(state.acked, seq)
            done = [cb for s, cb in state.waiting if s <= state.acked]
            state.waiting = [(s, cb) for s, cb in state.waiting if s > state.acked]
            if state.acked >= state.sent:
                del self._keys[(partition, key)]
            for callback in done:
                callback()

        def failed(reason: str) -> bool:
            self._on_failure()
            logger.error(
                "ledger write failed; will retry", extra={"error": reason, "partition": partition}
            )
            if self._keys.get((partition, key)) is not state or seq < state.sent:
                return False  # handed over, or a later write of this key covers it
            state.sent += 1
            self._produce(partition, key, state, state.sent)  # the latest value again
            return False

        self._acked.send(self.topic, partition, key.encode(), state.value, acked, failed)
