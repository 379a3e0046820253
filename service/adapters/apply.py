"""Apply one email's due changes to ActiveCampaign (runs on a worker thread).

For one email: upsert the contact (``contact/sync``, mapped attributes) unless its id is known
(ledger or cache) and nothing but membership changes; then one ``contactLists`` call per list as
the change's ledger ``plan`` says: status 1 for ENTERED, 2 for EXITED; for a first entry (no
record of ours) the contact's list statuses are read first and a status 2 is left alone (consent
kept). Each change gets its own outcome; an error that concerns the contact (invalid or excluded
email) fails them all, one that concerns a list fails only that change.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.adapters.activecampaign import ActiveCampaignClient
from service.adapters.lists import ListDirectory
from service.core.coalesce import PendingChange
from service.core.errors import (
    ApiError,
    AuthRejected,
    PermanentApiError,
    RateLimited,
    TransientApiError,
)
from service.core.ledger import Plan

CONTACT_CACHE_SIZE = 10_000


class OutcomeKind(enum.Enum):
    APPLIED = "applied"
    PERMANENT = "permanent"  # to the DLQ
    RETRY = "retry"  # back to the coalescer after a back-off
    AUTH = "auth"  # token refused: back to the coalescer, all traffic stops


@dataclass
class ChangeOutcome:
    change: PendingChange
    kind: OutcomeKind
    error: ApiError | None = None
    retry_after: float = 0.0
    applied_at: float = 0.0
    contact_id: str | None = None
    consent_kept: bool = False  # the person's own opt-out was found and left alone


def outcome_for_error(change: PendingChange, error: ApiError) -> ChangeOutcome:
    if isinstance(error, AuthRejected):
        return ChangeOutcome(change, OutcomeKind.AUTH, error)
    if isinstance(error, RateLimited):
        return ChangeOutcome(change, OutcomeKind.RETRY, error, retry_after=error.retry_after)
    if isinstance(error, PermanentApiError):
        return ChangeOutcome(change, OutcomeKind.PERMANENT, error)
    return ChangeOutcome(change, OutcomeKind.RETRY, error)


def split_attributes(
    attributes: Mapping[str, str], attribute_map: Mapping[str, str], field_map: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Event attributes -> (standard contact fields, custom field id -> value). Unmapped: dropped."""
    standard = {attribute_map[k]: v for k, v in attributes.items() if k in attribute_map}
    custom = {field_map[k]: v for k, v in attributes.items() if k in field_map}
    return standard, custom


def contact_fields(
    changes: list[PendingChange], attribute_map: Mapping[str, str], field_map: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The attributes of an email's changes merged in partition order (later wins), mapped."""
    attributes: dict[str, str] = {}
    for change in sorted(changes, key=lambda c: c.offsets[-1]):
        attributes.update(change.event.attributes)
    return split_attributes(attributes, attribute_map, field_map)


class ContactApplier:
    """Shared by all workers. The contact-id cache is a plain dict: GIL-atomic get/set, and a
    lost race only costs one extra ``contact/sync``."""

    def __init__(
        self,
        client: ActiveCampaignClient,
        lists: ListDirectory,
        attribute_map: Mapping[str, str],
        field_map: Mapping[str, str],
        clock: Callable[[], float],
    ) -> None:
        self.client = client
        self.lists = lists
        self.attribute_map = attribute_map
        self.field_map = field_map
        self.clock = clock
        self.contact_ids: dict[str, str] = {}

    def apply(
        self,
        email: str,
        changes: list[PendingChange],
        cancel: threading.Event | None = None,
        known_contact_id: str | None = None,
        send_fields: bool = True,
    ) -> list[ChangeOutcome]:
        """Apply one email's changes, each as its ``plan`` says. ``cancel`` (set when the
        partition is revoked) stops the work before the next request, so a stale write cannot
        land after the new owner's. ``known_contact_id`` (from the ledger) saves the
        ``contact/sync`` when ``send_fields`` is false."""
        cancel = cancel or threading.Event()
        standard, custom = contact_fields(changes, self.attribute_map, self.field_map)
        if not send_fields:
            standard, custom = {}, {}
        if known_contact_id is not None and not standard and not custom:
            self.contact_ids[email] = known_contact_id
        try:
            contact_id = self._contact_id(email, standard, custom)
        except ApiError as error:
            return [outcome_for_error(c, error) for c in changes]
        outcomes: list[ChangeOutcome] = []
        statuses: dict[str, int] | None = None  # the contact's lists, read once if needed
        for index, change in enumerate(changes):
            try:
                if change.plan in (Plan.SKIP, Plan.CONSENT_KEPT):
                    # Riding along for the contact's fields: no list request.
                    outcomes.append(
                        self._done(change, contact_id, change.plan is Plan.CONSENT_KEPT)
                    )
                    continue
                if cancel.is_set():
                    raise TransientApiError(None, "partition revoked")
                list_id = self.lists.list_id(change.target)
                if change.plan is Plan.FIRST_ENTRY:
                    # No record of ours for this list: never override the person's own opt-out.
                    if statuses is None:
                        statuses = self._contact_lists(email, contact_id, standard, custom)
                        contact_id = self.contact_ids.get(email, contact_id)
                    current = statuses.get(list_id)
                    if current == 2:
                        outcomes.append(self._done(change, contact_id, True))
                        continue
                    if current == 1:
                        outcomes.append(self._done(change, contact_id, False))
                        continue
                contact_id = self._set_status(email, contact_id, list_id, change, standard, custom)
                outcomes.append(self._done(change, contact_id, False))
            except ApiError as error:
                outcomes.append(outcome_for_error(change, error))
                if isinstance(error, AuthRejected | RateLimited | TransientApiError):
                    # The rest would fail the same way; do not spend budget finding out.
                    outcomes.extend(outcome_for_error(c, error) for c in changes[index + 1 :])
                    break
        return outcomes

    def _done(self, change: PendingChange, contact_id: str, consent_kept: bool) -> ChangeOutcome:
        return ChangeOutcome(
            change,
            OutcomeKind.APPLIED,
            applied_at=self.clock(),
            contact_id=contact_id,
            consent_kept=consent_kept,
        )

    def _contact_lists(
        self, email: str, contact_id: str, standard: dict[str, str], custom: dict[str, str]
    ) -> dict[str, int]:
        try:
            return self.client.contact_lists(contact_id)
        except PermanentApiError as error:
            if error.status != 404:
                raise
            # The known contact was deleted in AC: upsert it again (a new contact has no lists).
            self.contact_ids.pop(email, None)
            self._contact_id(email, standard, custom)
            return {}

    def _set_status(
        self,
        email: str,
        contact_id: str,
        list_id: str,
        change: PendingChange,
        standard: dict[str, str],
        custom: dict[str, str],
    ) -> str:
        try:
            self.client.set_list_status(contact_id, list_id, change.event.action.status)
        except PermanentApiError as error:
            if error.code != "related_missing":
                raise
            # The cached contact was deleted in AC: upsert it again and retry once.
            self.contact_ids.pop(email, None)
            contact_id = self._contact_id(email, standard, custom)
            self.client.set_list_status(contact_id, list_id, change.event.action.status)
        return contact_id

    def _contact_id(self, email: str, standard: dict[str, str], custom: dict[str, str]) -> str:
        cached = self.contact_ids.get(email)
        if cached is not None and not standard and not custom:
            return cached
        contact_id = self.client.sync_contact(email, standard, custom)
        if len(self.contact_ids) >= CONTACT_CACHE_SIZE:
            self.contact_ids.clear()  # bounded: the ledger is the lasting memory of contact ids
        self.contact_ids[email] = contact_id
        return contact_id
