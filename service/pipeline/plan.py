"""What one email's due changes need from AC, decided from the ledger. Pure.

``plan_group`` sets each change's ``plan`` (``service/core/ledger.py:plan_change``) and sorts
the group into one of four routes:

- ``settled``: nothing to send (every change is a state the ledger holds, a kept opt-out, an
  exit of a contact never ours, or older than what the ledger applied: stale) and no field
  changed: record it now, no request;
- ``verify``: an exit of a subscription of ours: AC is asked first whether the person is still
  subscribed (they may have opted out since; see ``service/core/bulk.py:verify_exits``);
- ``recheck``: a state left uncertain by a crash (a write of ours not confirmed): AC is read
  first, the state resolved in the ledger, and the group decided again;
- ``single``: per contact (``contactLists``): a re-entry after the service's own verified
  unsubscribe (an import never re-subscribes), or a change AC refused in an import;
- ``bulk``: may go in an import (a first entry, a verified unsubscribe, fields).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from service.core.coalesce import ListRef, PendingChange
from service.core.contact import contact_fields
from service.core.ledger import LedgerEntry, Plan, SetBy, fields_hash, plan_change


class Route(enum.Enum):
    SETTLED = "settled"
    RECHECK = "recheck"
    VERIFY = "verify"
    SINGLE = "single"
    BULK = "bulk"


@dataclass(frozen=True)
class GroupPlan:
    route: Route
    fields: tuple[dict[str, str], dict[str, str]] | None  # to send; None: unchanged
    fields_hash: int


def plan_group(
    group: list[PendingChange],
    entry: LedgerEntry | None,
    list_ids: Mapping[ListRef, str],
    attribute_map: Mapping[str, str],
    field_map: Mapping[str, str],
    verified_after: float = float("-inf"),
    stale_tolerance_ms: int | None = None,
) -> GroupPlan:
    """Decide every change of one email (one partition) and the group's route. Changes whose
    plan was settled by a verification (``UNSUBSCRIBE``) since ``verified_after`` keep it; an
    older verification is asked again."""
    for change in group:
        previous = (
            entry.state(change.target.label(), list_ids.get(change.target)) if entry else None
        )
        if (
            change.plan is Plan.UNSUBSCRIBE
            and change.verified_at >= verified_after
            and not (previous is not None and previous.pending)
        ):
            continue  # checked a moment ago, and no write of ours since left it uncertain
        change.previous = previous
        change.plan = plan_change(
            change.previous,
            change.event.action,
            change.partition,
            change.offsets[-1],
            change.event.occurred_at_ms,
            stale_tolerance_ms,
        )
    standard, custom = contact_fields(group, attribute_map, field_map)
    value = fields_hash(standard, custom)
    changed = (
        value != 0
        and (entry is None or entry.fields_hash != value)
        and _contact_of_ours(group, entry)
    )
    fields = (standard, custom) if changed else None
    plans = {c.plan for c in group}
    if plans <= {Plan.SKIP, Plan.STALE, Plan.CONSENT_KEPT} and not changed:
        return GroupPlan(Route.SETTLED, None, value)
    if Plan.RECHECK in plans:
        return GroupPlan(Route.RECHECK, fields, value)
    if Plan.EXIT in plans:
        return GroupPlan(Route.VERIFY, fields, value)
    if Plan.RESUBSCRIBE in plans or any(c.force_single for c in group):
        return GroupPlan(Route.SINGLE, fields, value)
    return GroupPlan(Route.BULK, fields, value)


_WRITES_OR_READS = (Plan.FIRST_ENTRY, Plan.RESUBSCRIBE, Plan.EXIT, Plan.UNSUBSCRIBE, Plan.RECHECK)


def _contact_of_ours(group: list[PendingChange], entry: LedgerEntry | None) -> bool:
    """Fields are sent only for a contact the service subscribes, or has subscribed, or knows
    to exist: sending them creates the contact (``contact/sync`` and imports both upsert), and
    an exit of someone the service never subscribed must not create anybody in AC."""
    if any(change.plan in _WRITES_OR_READS for change in group):
        return True
    return entry is not None and (
        entry.contact_id is not None
        or any(s.status == 1 or s.set_by is SetBy.SERVICE for s in entry.lists)
    )
