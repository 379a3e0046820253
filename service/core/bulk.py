"""The bulk path: many contacts per ``bulk_import`` request, confirmed through ``import/info``.

Pure: ``contact_entry`` (one email's changes -> one import contact), ``pack`` (entries ->
requests of at most 250 contacts and under 400000 encoded bytes), ``next_poll_delay``, and the
sans-IO calls ``submit_import`` and ``verify_exits``. AC's documented traps:

- one malformed email rejects the whole request (400, ``failureReasons`` by index): those
  contacts are set aside (the per-contact path then learns AC's exact error and parks them in
  the DLQ) and the rest is sent again at once. Indexes outside the request are ignored; a
  refusal that names none of its contacts sends them all per contact (never the same import
  again);
- the per-minute import limit answers 400 "Rate limit exceeded." (``RateLimited``):
  back-pressure, never a bad record;
- an import never re-subscribes a contact unsubscribed from a list: re-entries after the
  service's own (verified) unsubscribe go per contact (``contactLists``); a first entry may go
  in an import, and is recorded as *not verified* (the person's earlier opt-out may stand);
- an exit is sent only after AC said the contact is still subscribed (``verify_exits``, one read
  per 100 known contact ids, or one per email whose id is unknown).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.core.acapi import IDS_PER_READ, PAGE_SIZE, Call, bulk_import, contacts_page
from service.core.errors import ApiError, PermanentApiError

MAX_CONTACTS = 250
MAX_BYTES = 400_000
# contact/sync field names -> bulk import field names
IMPORT_FIELD_NAMES = {"firstName": "first_name", "lastName": "last_name", "phone": "phone"}
# Room for the request envelope around the contacts: {"contacts": [...]}
_ENVELOPE = len(json.dumps({"contacts": []}))


def contact_entry(
    email: str,
    list_ids: Mapping[str, int],
    standard: Mapping[str, str],
    custom: Mapping[str, str],
) -> dict[str, Any]:
    """One import contact. ``list_ids`` maps AC list id -> status (1 subscribe, 2 unsubscribe)."""
    entry: dict[str, Any] = {"email": email}
    for name, value in standard.items():
        entry[IMPORT_FIELD_NAMES.get(name, name)] = value
    if custom:
        entry["fields"] = [{"id": int(k), "value": v} for k, v in custom.items()]
    subscribe = [{"listid": lid} for lid, status in list_ids.items() if status == 1]
    unsubscribe = [{"listid": lid} for lid, status in list_ids.items() if status == 2]
    if subscribe:
        entry["subscribe"] = subscribe
    if unsubscribe:
        entry["unsubscribe"] = unsubscribe
    return entry


def encoded_size(entry: Mapping[str, Any]) -> int:
    return len(json.dumps(entry).encode())


def pack(
    sizes: Sequence[int], *, max_contacts: int = MAX_CONTACTS, max_bytes: int = MAX_BYTES
) -> list[list[int]]:
    """Indexes of entries per request: at most ``max_contacts`` each, encoded body under
    ``max_bytes`` (entries joined by ", "), in order. An entry too big on its own is alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = _ENVELOPE
    for index, entry_size in enumerate(sizes):
        extra = entry_size + (2 if current else 0)
        if current and (len(current) >= max_contacts or size + extra >= max_bytes):
            batches.append(current)
            current, size, extra = [], _ENVELOPE, entry_size
        current.append(index)
        size += extra
    if current:
        batches.append(current)
    return batches


def next_poll_delay(polls: int, expected: float, cap: float = 30.0) -> float:
    """Seconds until the next ``import/info`` poll, after ``polls`` answers of "processing":
    first at the expected processing time; after one "processing", half of it (the estimate
    drifts down to find AC's time, so a first poll is often just early: the 500,000-event
    load's last imports were confirmed 1.5 estimates after such a poll); then backing off by
    half each time, capped (polls count against the same budget)."""
    base = max(1.0, expected)
    if polls == 1:
        return min(cap, max(1.0, 0.5 * expected))
    return min(cap, base * (1.5 ** min(max(0, polls - 1), 30)))


def learn_expected(expected: float, done_by: float, processing_at: float | None) -> float:
    """The next estimate of AC's processing time, from one import AC reported completed
    ``done_by`` seconds after it was queued (the poll's time: AC may have finished any time
    before), after a "still processing" at ``processing_at`` seconds (None: done at the first
    poll). AC's time lies between the two; the sample is taken near the lower end.

    - Done at the first poll: AC took *at most* ``done_by``, and a poll that waited behind a
      minute's burst of imports says nothing about AC (learning from it pushed every next
      first poll 20-30 s out on a first load). The sample is 0.9 of the smaller of the two:
      the estimate drifts down until a first poll comes too early, instead of staying stuck
      above AC's time (polls at 4.3-4.6 s for imports AC completed in 3 s; each was the
      drain's last confirmation ~1.5 s late).
    - After a "still processing": AC took more than ``processing_at`` and at most ``done_by``
      (1.5 times the estimate later): 1.2 times the former, within the interval.
    Averaged (0.3 weight), one sample at most a minute."""
    if processing_at is None:
        sample = 0.9 * min(done_by, expected)
    else:
        sample = min(done_by, 1.2 * processing_at)
    return 0.7 * expected + 0.3 * min(sample, 60.0)


@dataclass
class Submitted:
    """What one submission produced, by the index of each entry in the request."""

    batch_id: str | None = None
    sent: list[int] = field(default_factory=list)  # covered by batch_id (or by ``error``)
    rejected: list[int] = field(default_factory=list)  # AC refused them: per-contact path
    error: ApiError | None = None  # the request failed: ``sent`` were not (surely) queued
    requests: int = 0  # bulk_import requests sent (more than one after AC refused contacts)


def submit_import(entries: Sequence[Mapping[str, Any]]) -> Call[Submitted]:
    """Send one import of ``entries`` (already packed: <= 250, < 400000 bytes)."""
    result = Submitted()
    left = list(range(len(entries)))
    while left:
        payload = {"contacts": [entries[i] for i in left]}
        result.requests += 1
        try:
            result.batch_id = yield from bulk_import(payload)
            result.sent = left
            return result
        except PermanentApiError as error:
            bad = {left[i] for i in failed_indexes(error) if 0 <= i < len(left)}
            if not bad:
                # A refusal that names none of these contacts: each goes per contact, where
                # AC says exactly what is wrong (never the same request again).
                result.rejected += left
                result.error = error
                return result
            result.rejected += sorted(bad)
            left = [i for i in left if i not in bad]
        except ApiError as error:
            result.error = error
            result.sent = left
            return result
    return result


def failed_indexes(error: PermanentApiError) -> set[int]:
    """Contact indexes from a 400 ``failureReasons`` list (kept on the error)."""
    reasons = error.body
    if not isinstance(reasons, dict):
        return set()
    return {
        int(item["contact"])
        for item in reasons.get("failureReasons") or []
        if isinstance(item, dict)
        and isinstance(item.get("contact"), int)
        and not isinstance(item.get("contact"), bool)
    }


@dataclass
class Verified:
    """Which exiting contacts AC still has subscribed to one list (email -> contact id); every
    other email asked about is not subscribed there (the person's own status 2, or none)."""

    subscribed: dict[str, str] = field(default_factory=dict)
    reads: int = 0
    unasked: set[str] = field(default_factory=set)  # left for a later verification


def verify_exits(list_id: str, emails: Mapping[str, str | None]) -> Call[Verified]:
    """Ask AC which of ``emails`` (email -> contact id when known) are still subscribed (status
    1) to the list. Asked right before the unsubscribe is sent: a 2 found here is the person's.

    Known ids are asked 100 at a time (``ids[]``). Emails whose id is unknown (subscribed by an
    import, which does not say which id is whose) are asked one at a time, unless reading the
    list's subscribed members page by page (keyset on the id, 100 a page) costs fewer requests:
    then one pass answers them all and learns their ids. The first page says how many pages the
    pass would take (``meta.total``), so the choice costs one request at most."""
    result = Verified()
    known = sorted({cid for cid in emails.values() if cid})
    unknown = sorted(e for e, cid in emails.items() if not cid)
    for start in range(0, len(known), IDS_PER_READ):
        chunk = known[start : start + IDS_PER_READ]
        page = yield from contacts_page(list_id=list_id, status=1, ids=chunk)
        result.reads += 1
        result.subscribed.update(
            {email: cid for email, cid in page.contacts.items() if email in emails}
        )
    if len(unknown) > SCAN_AFTER:
        first = yield from contacts_page(list_id=list_id, status=1)
        result.reads += 1
        pages = -(-max(first.total, 0) // PAGE_SIZE)
        if first.total >= 0 and pages - 1 < len(unknown):
            wanted = set(unknown)
            page = first
            while True:
                result.subscribed.update({e: c for e, c in page.contacts.items() if e in wanted})
                if len(page.contacts) < PAGE_SIZE or page.last_id < 0:
                    return result
                page = yield from contacts_page(list_id=list_id, status=1, id_greater=page.last_id)
                result.reads += 1
        # Fewer emails than pages: one at a time after all (the first page may answer some).
        result.subscribed.update({e: c for e, c in first.contacts.items() if e in unknown})
    asked = 0
    for email in unknown:
        if email in result.subscribed:
            continue
        if asked >= ONE_BY_ONE:
            result.unasked.add(email)  # answers spread over many seconds would be stale
            continue
        asked += 1
        page = yield from contacts_page(list_id=list_id, status=1, email=email, limit=1)
        result.reads += 1
        if email in page.contacts:
            result.subscribed[email] = page.contacts[email]
    return result


SCAN_AFTER = 4  # unknown ids in one verification before reading the list is considered
ONE_BY_ONE = 8  # unknown ids asked one at a time in one verification (the rest: the next)
