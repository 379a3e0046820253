"""The applied-state ledger: what this service last set in ActiveCampaign, per email and list.

Pure parts (no I/O): the record types, ``plan_change`` (what a change needs, given what the
ledger holds), ``merged`` (the next entry after an outcome), here; the Avro codec
(``ledger_codec.py``) and ``CompactIndex`` (the in-memory form, ``ledger_index.py``) beside it.
``service/adapters/ledger_store.py`` is the Kafka shell around them.

Invariants:
- a ledger entry is written only after AC confirmed every list state it records, and the source
  offsets of those changes complete only on the broker's ack of the write;
- ``set_by`` SERVICE on a *verified* status 2 means this service unsubscribed the contact after
  reading that AC still had it subscribed: only then may an ENTERED set status 1 again through
  ``contactLists``. A status 2 set by anyone else (PERSON), of unknown origin (UNKNOWN) or not
  verified is never overridden (an ENTERED then subscribes the way an import does: never over a
  status 2 that AC holds);
- ``verified`` says whether the service knew AC's status when it recorded it. A subscription
  made by an import is not verified: AC never re-subscribes through an import, so a person who
  had opted out before stays out, and the ledger's 1 may be AC's 2. An exit of a subscription of
  ours therefore reads AC first (``Plan.EXIT``);
- a state recorded for another list id than the list's current one (the list was deleted and
  created again) is no state at all;
- a change is skipped only when the ledger already holds its target state, holds the state of
  a later record of the same partition (offset *and* event time both later: a replay), or is an
  exit for a contact the ledger has no subscription of ours for (nothing of ours to undo).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from typing import NamedTuple

from service.core.model import Action

# Keys of the ledger topic that are not emails (no "@"): the partition's import history, and an
# import that may still land (``import/<id>``, its value naming the emails it carries).
BUDGET_KEY = "import-budget"
INTENT_PREFIX = "import/"


class SetBy(enum.IntEnum):
    SERVICE = 0
    PERSON = 1
    UNKNOWN = 2


class ListState(NamedTuple):
    """One list's state for one email, with the event that set it."""

    list: str
    status: int  # 1 subscribed, 2 unsubscribed
    set_by: SetBy
    event_id: str
    event_time_ms: int
    applied_at_ms: int
    source_partition: int
    source_offset: int
    audience_id: str
    audience_name: str
    campaign_id: str | None = None
    treatment_group: str | None = None
    verified: bool = False
    list_id: str | None = None
    pending: int = 0  # writes of ours not confirmed yet (``pending_bits``); 0: none
    pending_since_ms: int = 0  # when a pending unsubscribe was first announced (wall clock)

    @property
    def pending_statuses(self) -> frozenset[int]:
        """The statuses a write of ours may have set in AC without its outcome being recorded
        (a crash came between): if AC shows one of them, it is ours."""
        bits = self.pending % PENDING_IMPORT
        return frozenset(s for s in (1, 2) if bits & pending_bit(s))

    @property
    def pending_import(self) -> bool:
        return self.pending >= PENDING_IMPORT


# ``pending`` = the bits of the statuses being set (1 -> 1, 2 -> 2), plus PENDING_IMPORT when
# one goes through an import (it may land long after it was sent). A new write-ahead adds its
# bit to an unresolved one: it never erases an uncertainty.
PENDING_IMPORT = 10


def pending_bit(status: int) -> int:
    return 1 if status == 1 else 2


def with_pending(pending: int, status: int, *, via_import: bool) -> int:
    bits = (pending % PENDING_IMPORT) | pending_bit(status)
    return bits + (PENDING_IMPORT if via_import or pending >= PENDING_IMPORT else 0)


class LedgerEntry(NamedTuple):
    contact_id: str | None
    fields_hash: int
    lists: tuple[ListState, ...]

    def state(self, list_label: str, list_id: str | None = None) -> ListState | None:
        """The state of one list; with ``list_id``, only if it was recorded for that list id
        (or for an unknown one: version-1 records)."""
        for item in self.lists:
            if item.list == list_label:
                if item.status == 0 and not item.pending:
                    return None  # a write-ahead taken back: no state (kept so it wins a merge)
                if list_id is not None and item.list_id is not None and item.list_id != list_id:
                    return None  # the list was deleted and created again since
                return item
        return None

    def newest_offset(self) -> int:
        """The largest source offset among the states (a version of the entry: one email's
        events live in one partition, and every write covers the newest change it knows)."""
        return max((s.source_offset for s in self.lists), default=-1)


class Plan(enum.Enum):
    """What one change needs from AC, decided from the ledger."""

    SKIP = "skip"  # the ledger already holds this state (or a later one): no request
    STALE = "stale"  # older (by occurred_at) than the event the ledger applied: no request
    CONSENT_KEPT = "consent_kept"  # ENTERED, but the person opted out: no request, record it
    EXIT = "exit"  # EXITED of our subscription: read AC's status first (then UNSUBSCRIBE)
    RECHECK = "recheck"  # a write of ours may or may not have landed: read AC, then decide
    UNSUBSCRIBE = "unsubscribe"  # AC still had it subscribed when we read: set status 2
    RESUBSCRIBE = "resubscribe"  # ENTERED after our own verified unsubscribe: contactLists 1
    FIRST_ENTRY = (
        "first_entry"  # ENTERED, no trusted state: subscribe without overriding an opt-out
    )


def plan_change(
    state: ListState | None,
    action: Action,
    partition: int,
    offset: int,
    event_time_ms: int,
    stale_tolerance_ms: int | None = None,
) -> Plan:
    """The decision table (pure). ``offset`` is the change's last source offset.

    The staleness guard (``stale_tolerance_ms``; None: off): a change that occurred more than
    the tolerance before the event the ledger applied for this email and list is ``STALE``
    and sends nothing. Kafka orders one partition only; a redriven record, a producer that
    re-sends late, or a second producer would otherwise let an old ENTERED undo a newer
    EXITED. The tolerance covers producers' clock skew: within it, offset order decides."""
    if state is not None and state.pending:
        # A crash came between a write of ours and its confirmation: the state is uncertain.
        return Plan.RECHECK
    if state is None:
        # An exit for a contact this service never subscribed: nothing of ours to undo. Writing a
        # status 2 here would make it look like ours, and a later entry would then override an
        # opt-out the person may have made before we ever saw them.
        return Plan.FIRST_ENTRY if action is Action.ENTERED else Plan.SKIP
    if (
        state.source_partition == partition
        and offset <= state.source_offset
        and event_time_ms <= state.event_time_ms
    ):
        return Plan.SKIP  # a replay: the ledger holds what a later record of this partition set
    if stale_tolerance_ms is not None and event_time_ms + stale_tolerance_ms < state.event_time_ms:
        return Plan.STALE
    if action is Action.ENTERED:
        if state.status == 1:
            return Plan.SKIP
        if state.set_by is SetBy.SERVICE and state.verified:
            return Plan.RESUBSCRIBE
        if state.set_by is SetBy.PERSON:
            return Plan.CONSENT_KEPT
        return Plan.FIRST_ENTRY  # UNKNOWN, or an unverified SERVICE: never override a 2
    return Plan.SKIP if state.status == 2 else Plan.EXIT


class Known(NamedTuple):
    """What a change left in AC, as the service knows it: recorded in the ledger."""

    status: int
    set_by: SetBy
    verified: bool


CLOCK_MARGIN_SECONDS = 2.0  # AC's timestamps are to the second; clocks differ a little


def rechecked(
    state: ListState, ac_status: int | None, unsubscribed_at: float | None = None
) -> Known | None:
    """What an uncertain state (``pending``) means, now that AC says ``ac_status`` (None: not a
    member): the write landed (AC holds what we were setting: ours), or it did not (AC holds
    what we had recorded), or someone else changed it. None: nothing of ours there.

    A status 2 that AC dates (``udate``) clearly before our write-ahead (or does not date) was
    not shown to be set by it: the person's (the one case the service would otherwise
    override). A 2 set after it is taken as ours: a person who opts out in that window (between
    the write-ahead and the next owner's check, seconds unless a crash) cannot be told apart
    from the service's own exit."""
    before_us = ac_status == 2 and (
        unsubscribed_at is None  # AC did not say when: it cannot be shown to be ours
        or unsubscribed_at + CLOCK_MARGIN_SECONDS <= state.pending_since_ms / 1000
    )
    if ac_status is not None and ac_status in state.pending_statuses and not before_us:
        return Known(ac_status, SetBy.SERVICE, True)
    if ac_status == state.status:
        return Known(state.status, state.set_by, state.verified)
    if ac_status is None:
        return None
    if before_us:
        return Known(2, SetBy.PERSON, True)
    return Known(ac_status, SetBy.SERVICE if ac_status == 1 else SetBy.UNKNOWN, True)


def plan_known(known: Known | None, action: Action) -> Plan:
    """The decision table on a state just read from AC (after a recheck)."""
    if known is None:
        return Plan.FIRST_ENTRY if action is Action.ENTERED else Plan.SKIP
    if action is Action.ENTERED:
        if known.status == 1:
            return Plan.SKIP
        if known.set_by is SetBy.SERVICE and known.verified:
            return Plan.RESUBSCRIBE
        return Plan.CONSENT_KEPT if known.set_by is SetBy.PERSON else Plan.FIRST_ENTRY
    return Plan.SKIP if known.status == 2 else Plan.UNSUBSCRIBE


# What each way of applying a change leaves, by what AC held before (``None``: not asked).
SUBSCRIBED_BY_IMPORT = Known(1, SetBy.SERVICE, False)  # an import never re-subscribes a 2
SUBSCRIBED = Known(1, SetBy.SERVICE, True)  # per contact: AC said so after we asked or wrote
UNSUBSCRIBED_BY_US = Known(2, SetBy.SERVICE, True)  # AC had 1 when we read, we set 2
OPTED_OUT = Known(2, SetBy.PERSON, True)  # AC had 2 that we did not set: the person's
# An exit of a contact never ours: nothing sent, AC not asked (recorded for the event's time).
EXIT_SEEN = Known(2, SetBy.UNKNOWN, False)


def merged(
    entry: LedgerEntry | None,
    states: list[ListState],
    contact_id: str | None,
    fields_hash: int | None,
) -> LedgerEntry:
    """``entry`` with ``states`` replacing the states of their lists."""
    lists = {s.list: s for s in (entry.lists if entry else ())}
    for state in states:
        lists[state.list] = state
    return LedgerEntry(
        contact_id or (entry.contact_id if entry else None),
        fields_hash if fields_hash is not None else (entry.fields_hash if entry else 0),
        tuple(lists.values()),
    )


def newest(older: LedgerEntry | None, newer: LedgerEntry) -> LedgerEntry:
    """Two records of one email read from the ledger in log order, as one entry: per list the
    state of the later source record (log order breaks ties). A write can land after a newer
    one (a replica that lost its partitions while a write was on the wire); compaction would
    then keep the older. Restore merges and rewrites (``LedgerStore``), so the newest state of
    every list wins whatever the log order."""
    if older is None:
        return newer
    lists = {s.list: s for s in older.lists}
    for state in newer.lists:
        current = lists.get(state.list)
        if current is None or (state.source_offset, state.applied_at_ms) >= (
            current.source_offset,
            current.applied_at_ms,
        ):
            lists[state.list] = state
    newer_wins = newer.newest_offset() >= older.newest_offset()
    first, second = (older, newer) if newer_wins else (newer, older)
    return LedgerEntry(
        second.contact_id or first.contact_id,
        second.fields_hash if second.fields_hash else first.fields_hash,
        tuple(lists.values()),
    )


def fields_hash(standard: Mapping[str, str], custom: Mapping[str, str]) -> int:
    """A stable 63-bit hash of the mapped fields (0 means none). Stable across processes,
    unlike ``hash()``, because it is stored."""
    if not standard and not custom:
        return 0
    text = json.dumps([sorted(standard.items()), sorted(custom.items())])
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1
    return value or 1
