"""Apply one email's due changes to ActiveCampaign (runs on a worker thread).

For one email: upsert the contact (``contact/sync``, mapped attributes) unless its id is cached
and nothing but membership changes; then one ``contactLists`` call per list: status 1 for ENTERED,
2 for EXITED. Each change gets its own outcome; an error that concerns the contact (invalid or
excluded email) fails them all, one that concerns a list fails only that change.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.activecampaign import ActiveCampaignClient
from service.coalesce import PendingChange
from service.errors import (
    ApiError,
    AuthRejected,
    PermanentApiError,
    RateLimited,
    TransientApiError,
)
from service.lists import ListDirectory


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
    for change in sorted(changes, key=lambda c: c.offsets[-1].offset):
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
        self, email: str, changes: list[PendingChange], cancel: threading.Event | None = None
    ) -> list[ChangeOutcome]:
        """Apply one email's changes. ``cancel`` (set when the partition is revoked) stops the
        work before the next request, so a stale write cannot land after the new owner's."""
        cancel = cancel or threading.Event()
        standard, custom = contact_fields(changes, self.attribute_map, self.field_map)
        try:
            contact_id = self._contact_id(email, standard, custom)
        except ApiError as error:
            return [outcome_for_error(c, error) for c in changes]
        outcomes: list[ChangeOutcome] = []
        for index, change in enumerate(changes):
            try:
                if cancel.is_set():
                    raise TransientApiError(None, "partition revoked")
                list_id = self.lists.list_id(change.target)
                try:
                    self.client.set_list_status(contact_id, list_id, change.event.action.status)
                except PermanentApiError as error:
                    if error.code != "related_missing":
                        raise
                    # The cached contact was deleted in AC: upsert it again and retry once.
                    self.contact_ids.pop(email, None)
                    contact_id = self._contact_id(email, standard, custom)
                    self.client.set_list_status(contact_id, list_id, change.event.action.status)
                outcomes.append(ChangeOutcome(change, OutcomeKind.APPLIED, applied_at=self.clock()))
            except ApiError as error:
                outcomes.append(outcome_for_error(change, error))
                if isinstance(error, AuthRejected | RateLimited | TransientApiError):
                    # The rest would fail the same way; do not spend budget finding out.
                    outcomes.extend(outcome_for_error(c, error) for c in changes[index + 1 :])
                    break
        return outcomes

    def _contact_id(self, email: str, standard: dict[str, str], custom: dict[str, str]) -> str:
        cached = self.contact_ids.get(email)
        if cached is not None and not standard and not custom:
            return cached
        contact_id = self.client.sync_contact(email, standard, custom)
        self.contact_ids[email] = contact_id
        return contact_id
