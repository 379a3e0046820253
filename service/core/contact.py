"""One email's due changes, applied per contact (sans-IO: a ``Call`` that a worker drives).

For one email: upsert the contact (``contact/sync``, mapped attributes) when fields changed or
its id is needed and unknown; then per list, as the change's ``plan`` says:

- ``FIRST_ENTRY``: read the contact's lists once; a status 2 is left alone (the person's own
  opt-out, or a status the service never set), a 1 is already right, else subscribe (1). Not
  read when ``contact/sync`` just created the contact (201): a new contact is on no list;
- ``RESUBSCRIBE``: the ledger says this service unsubscribed them after checking: status 1;
- ``UNSUBSCRIBE``: AC still had them subscribed when the exit was verified: status 2;
- ``EXIT`` (not verified yet: a lone exit): read the contact's lists; 1 -> status 2, else
  nothing (a 2 there is not ours);
- a state the ledger holds as uncertain (``RECHECK``) never comes here: it is read and
  resolved first (``service/pipeline/deliver.py``).

An exit never creates a contact: its id comes from the ledger, from the verification, or from
a lookup by email (no ``contact/sync``: a person deleted in AC must not come back because they
left an audience). Each change gets its own outcome; an error about the contact (invalid or
excluded email) fails them all, one about a list fails only that change (and names the list
when AC says it no longer exists).
"""

from __future__ import annotations

from collections.abc import Mapping

from service.core.acapi import (
    Call,
    Membership,
    contact_lists,
    contacts_page,
    set_list_status,
    sync_contact,
)
from service.core.coalesce import ListRef, PendingChange
from service.core.errors import (
    AccountBlocked,
    ApiError,
    PermanentApiError,
    RateLimited,
    TransientApiError,
)
from service.core.ledger import (
    OPTED_OUT,
    SUBSCRIBED,
    UNSUBSCRIBED_BY_US,
    Known,
    Plan,
    SetBy,
)
from service.core.outcome import Outcome, OutcomeKind, outcome_for_error

NOT_A_MEMBER = Known(2, SetBy.UNKNOWN, True)  # AC has no membership (or no contact): not ours
NOT_SUBSCRIBED = Known(2, SetBy.UNKNOWN, True)  # a 2 we did not set (or cannot tell)
_WRITES = (Plan.FIRST_ENTRY, Plan.RESUBSCRIBE)
_READS_FIRST = (Plan.FIRST_ENTRY, Plan.EXIT)


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


def _is_list_error(error: PermanentApiError) -> bool:
    return error.code == "related_missing" and error.pointer.endswith("/list")


def apply_contact(
    email: str,
    changes: list[PendingChange],
    list_ids: Mapping[ListRef, str],
    contact_id: str | None,
    fields: tuple[dict[str, str], dict[str, str]] | None,
) -> Call[list[Outcome]]:
    """Apply one email's changes, each as its ``plan`` says. ``list_ids`` holds the AC id of
    every list the changes name; ``contact_id`` is the ledger's (or the verification's);
    ``fields`` are the mapped attributes to send (None: unchanged, send nothing)."""
    standard, custom = fields if fields is not None else ({}, {})
    needs_write = fields is not None or any(c.plan in _WRITES for c in changes)
    statuses: dict[str, Membership] | None = None  # the contact's lists, read once if needed
    try:
        if needs_write and (contact_id is None or fields is not None):
            synced = yield from sync_contact(email, standard, custom)
            contact_id = synced.contact_id
            if synced.created:
                # AC made the contact just now (201): it is on no list, so there is no opt-out
                # to find and nothing to read (a trickle of new people saves a request each).
                statuses = {}
        elif contact_id is None and any(
            c.plan in (*_READS_FIRST, Plan.UNSUBSCRIBE) for c in changes
        ):
            found = yield from contacts_page(email=email, limit=1)
            contact_id = found.contacts.get(email)
    except ApiError as error:
        return [outcome_for_error(c, error) for c in changes]
    outcomes: list[Outcome] = []
    for index, change in enumerate(changes):
        list_id = list_ids.get(change.target)
        try:
            if change.plan in (Plan.SKIP, Plan.STALE, Plan.CONSENT_KEPT):
                # Riding along for the contact's fields: no list request.
                outcomes.append(Outcome(change, OutcomeKind.APPLIED, contact_id=contact_id))
                continue
            if contact_id is None:  # an exit of a contact AC no longer has
                outcomes.append(Outcome(change, OutcomeKind.APPLIED, NOT_A_MEMBER))
                continue
            assert list_id is not None, "lists are resolved before their changes are sent"
            plan: Plan = change.plan
            current: int | None = None
            if plan in _READS_FIRST:
                if statuses is None:
                    statuses = yield from contact_lists(contact_id)
                membership = statuses.get(list_id)
                if membership is not None:
                    current = membership.status
            if plan is Plan.FIRST_ENTRY and current in (1, 2):
                known = SUBSCRIBED if current == 1 else OPTED_OUT
                outcomes.append(Outcome(change, OutcomeKind.APPLIED, known, contact_id=contact_id))
                continue
            if plan is Plan.EXIT and current != 1:
                known = NOT_A_MEMBER if current is None else NOT_SUBSCRIBED
                outcomes.append(Outcome(change, OutcomeKind.APPLIED, known, contact_id=contact_id))
                continue
            status = 1 if plan in _WRITES else 2
            yield from set_list_status(contact_id, list_id, status)
            known = SUBSCRIBED if status == 1 else UNSUBSCRIBED_BY_US
            outcomes.append(Outcome(change, OutcomeKind.APPLIED, known, contact_id=contact_id))
        except PermanentApiError as error:
            outcome = outcome_for_error(change, error)
            if _is_list_error(error) and list_id is not None:
                # The list was deleted in AC: resolve it again (or create it), then retry.
                outcome = Outcome(change, OutcomeKind.RETRY, error=error, list_gone=list_id)
            elif error.code == "related_missing" or error.status == 404:
                # The contact was deleted in AC since its id was learned: learn it again.
                outcome = Outcome(change, OutcomeKind.RETRY, error=error, contact_gone=True)
            outcomes.append(outcome)
        except ApiError as error:
            outcomes.append(outcome_for_error(change, error))
            if isinstance(error, AccountBlocked | RateLimited | TransientApiError):
                # The rest would fail the same way; do not spend budget finding out.
                outcomes.extend(outcome_for_error(c, error) for c in changes[index + 1 :])
                break
    return outcomes
