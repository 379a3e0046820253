"""The bulk path: many contacts per ``bulk_import`` request, confirmed through ``import/info``.

Pure parts: ``contact_entry`` (one email's due changes -> one import contact), ``pack`` (entries ->
requests of at most 250 contacts and under 400000 encoded bytes) and ``next_poll_delay``.
``BulkImporter`` is the I/O: it resolves list ids, sends, and handles AC's documented traps:

- one malformed email rejects the whole request (400, ``failureReasons`` by index): those
  contacts are set aside (the per-contact path then learns AC's exact error and parks them in the
  DLQ) and the rest is sent again at once;
- the per-minute import limit answers 400 "Rate limit exceeded." (``RateLimited``): back-pressure,
  never a bad record;
- an import never re-subscribes a contact unsubscribed from a list: the runner sends ENTERED
  changes for lists this service unsubscribed (the ledger says so) per contact (``contactLists``);
  a first entry (no record of ours) may go in an import, and once it completed ``opted_out``
  asks AC which of those contacts stayed unsubscribed: their own opt-out, kept and recorded as
  such. The runner batches that question per list across imports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from service.adapters.activecampaign import PAGE_SIZE, ActiveCampaignClient, ImportStatus
from service.adapters.lists import ListDirectory
from service.core.coalesce import ListRef, PendingChange
from service.core.errors import ApiError, PermanentApiError
from service.core.ledger import Plan
from service.core.model import Action

MAX_CONTACTS = 250
MAX_BYTES = 400_000
# contact/sync field names -> bulk import field names
IMPORT_FIELD_NAMES = {"firstName": "first_name", "lastName": "last_name", "phone": "phone"}
# Room for the request envelope around the contacts: {"contacts": [...]}
_ENVELOPE = len(json.dumps({"contacts": []}))


@dataclass
class Group:
    """One email's due changes (all from one partition)."""

    email: str
    changes: list[PendingChange]


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


def next_poll_delay(polls: int, expected: float) -> float:
    """Seconds until the next ``import/info`` poll: first at the expected processing time, then
    backing off by half each time, capped at 30 s (polls count against the same budget)."""
    return min(30.0, max(1.0, expected) * (1.5**polls))


@dataclass
class Submitted:
    """What one submission produced."""

    batch_id: str | None = None
    sent: list[Group] = field(default_factory=list)  # covered by batch_id
    rejected: list[Group] = field(default_factory=list)  # AC refused them: per-contact path
    failed: list[tuple[Group, ApiError]] = field(default_factory=list)  # list errors etc.
    error: ApiError | None = None  # the request itself failed: all of ``sent`` must be retried
    requests: int = 0  # bulk_import requests sent (more than one after AC refused contacts)
    unsent: list[Group] = field(default_factory=list)  # did not fit this import: for the next


class BulkImporter:
    def __init__(
        self,
        client: ActiveCampaignClient,
        lists: ListDirectory,
        attribute_map: Mapping[str, str],
        field_map: Mapping[str, str],
    ) -> None:
        self.client = client
        self.lists = lists
        self.attribute_map = attribute_map
        self.field_map = field_map
        # list id -> AC's last count of its unsubscribed members (chooses how to check consent)
        self.unsubscribed: dict[str, int] = {}

    def entry_for(self, group: Group) -> dict[str, Any]:
        from service.adapters.apply import contact_fields

        standard, custom = contact_fields(group.changes, self.attribute_map, self.field_map)
        statuses = {
            self.lists.list_id(c.target): (1 if c.event.action is Action.ENTERED else 2)
            for c in group.changes
            if c.plan in (Plan.SET, Plan.FIRST_ENTRY)  # others ride along for the fields only
        }
        return contact_entry(group.email, statuses, standard, custom)

    def submit(self, groups: list[Group]) -> Submitted:
        """Send one import (<= 250 contacts, < 400000 bytes; the caller packs)."""
        result = Submitted()
        entries: list[tuple[Group, dict[str, Any]]] = []
        for group in groups:
            try:
                entries.append((group, self.entry_for(group)))
            except PermanentApiError as error:
                result.failed.append((group, error))
            except ApiError as error:
                result.error = error
                result.sent = groups
                return result
        # At most 250 contacts and under 400000 encoded bytes: what does not fit waits for the
        # next import (AC would refuse the whole request).
        fits = pack([encoded_size(entry) for _, entry in entries])
        if len(fits) > 1:
            result.unsent = [group for group, _ in entries[len(fits[0]) :]]
            entries = entries[: len(fits[0])]
        while entries:
            payload = {"contacts": [entry for _, entry in entries]}
            result.requests += 1
            try:
                result.batch_id = self.client.bulk_import(payload)
                result.sent = [group for group, _ in entries]
                return result
            except PermanentApiError as error:
                bad = _failed_indexes(error)
                if not bad:
                    result.error = error
                    result.sent = [group for group, _ in entries]
                    return result
                result.rejected += [entries[i][0] for i in sorted(bad) if i < len(entries)]
                entries = [item for i, item in enumerate(entries) if i not in bad]
            except ApiError as error:
                result.error = error
                result.sent = [group for group, _ in entries]
                return result
        return result

    def confirm(self, batch_id: str) -> ImportStatus:
        """Poll one import (``import/info``)."""
        return self.client.import_info(batch_id)

    def opted_out(self, target: ListRef, emails: Set[str], ids: Sequence[str]) -> set[str]:
        """Which of ``emails`` are unsubscribed from the list now. Asked once completed imports
        subscribed them as first entries: an import never re-subscribes, so these are people
        who had opted out themselves. ``ids`` are the contact ids of those imports.

        One request when the list's unsubscribed members fit in one page (a fresh list, the
        common case on a first load): the whole set, whatever the number of imports checked.
        Otherwise ``ids[]`` queries, 250 ids each (only the unsubscribed among them come back).
        Whole-list reads stop at one page on purpose: paging a set that changes between pages
        could skip a member, and a missed opt-out would be recorded as our subscription.
        """
        list_id = self.lists.list_id(target)
        if consent_read_mode(self.unsubscribed.get(list_id)) == "list":
            members, total = self.client.list_page(list_id, 2)
            self.unsubscribed[list_id] = total
            if total <= len(members):
                return set(emails & members.keys())
        found: set[str] = set()
        for start in range(0, len(ids), MAX_CONTACTS):
            chunk = ids[start : start + MAX_CONTACTS]
            found |= self.client.list_members(list_id, 2, chunk).keys()
        return set(emails & found)


def consent_ids(
    first_entries: Mapping[ListRef, Set[str]],
    known_ids: Mapping[str, str],
    success_ids: Sequence[str],
) -> dict[ListRef, list[str]]:
    """Per list, the contact ids to ask about (``ids[]``) after one import completed.

    ``known_ids`` maps the import's emails to the contact id the ledger holds for them. A known
    contact is asked about only on the lists it first entered; every id AC reported that is not
    a known one (a contact new to us, or one whose id changed) is asked about on every list with
    first entries. So no first entry is missed, and an import of contacts we know costs reads in
    proportion to its first entries rather than to its size.
    """
    known = set(known_ids.values())
    unknown = [i for i in success_ids if i not in known]
    result: dict[ListRef, list[str]] = {}
    for target, emails in first_entries.items():
        ids = [known_ids[e] for e in emails if e in known_ids]
        result[target] = sorted(set(ids)) + unknown
    return result


def consent_read_mode(unsubscribed: int | None) -> str:
    """How to learn who stayed unsubscribed: ``list`` (one page of the list's unsubscribed
    members, while we know of no more than a page; unknown counts as small) or ``ids``."""
    return "list" if unsubscribed is None or unsubscribed <= PAGE_SIZE else "ids"


def _failed_indexes(error: PermanentApiError) -> set[int]:
    """Contact indexes from a 400 ``failureReasons`` list (kept on the error by the client)."""
    reasons = getattr(error, "body", None)
    if not isinstance(reasons, dict):
        return set()
    return {
        int(item["contact"])
        for item in reasons.get("failureReasons") or []
        if isinstance(item, dict) and isinstance(item.get("contact"), int)
    }
