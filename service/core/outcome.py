"""What AC work produced for each change: the value the pipeline records, parks or retries."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from service.core.coalesce import PendingChange
from service.core.errors import (
    AccountBlocked,
    ApiError,
    PermanentApiError,
    RateLimited,
)
from service.core.ledger import Known


class OutcomeKind(enum.Enum):
    APPLIED = "applied"  # AC holds the change's state (or it needed nothing): record it
    PERMANENT = "permanent"  # AC refused this change: to the DLQ
    RETRY = "retry"  # back to the coalescer after a back-off
    BLOCKED = "blocked"  # the account refuses everything (token, URL): all sending stops


@dataclass
class Outcome:
    change: PendingChange
    kind: OutcomeKind
    known: Known | None = None  # APPLIED: what AC now holds (None: the state is unchanged)
    error: ApiError | None = None
    retry_after: float = 0.0
    contact_id: str | None = None
    list_gone: str | None = None  # AC says this list id no longer exists: resolve it again
    contact_gone: bool = False  # AC no longer has the contact id we used: learn it again


def outcome_for_error(change: PendingChange, error: ApiError) -> Outcome:
    if isinstance(error, AccountBlocked):
        return Outcome(change, OutcomeKind.BLOCKED, error=error)
    if isinstance(error, RateLimited):
        return Outcome(change, OutcomeKind.RETRY, error=error, retry_after=error.retry_after)
    if isinstance(error, PermanentApiError):
        return Outcome(change, OutcomeKind.PERMANENT, error=error)
    return Outcome(change, OutcomeKind.RETRY, error=error)
