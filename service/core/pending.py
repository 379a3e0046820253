"""What waits in the coalescer: one pending change per (partition, email, list), and the list
it is for (``ListRef``). Data only; ``coalesce.py`` holds the rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from service.core.ledger import ListState, Plan
from service.core.model import MembershipEvent


class ListRef(NamedTuple):
    """An AC list: by name (found or created) or by an id given in the mapping file."""

    name: str | None = None
    list_id: str | None = None

    def label(self) -> str:
        return self.name if self.name is not None else f"#{self.list_id}"


ChangeKey = tuple[int, str, ListRef]


@dataclass(slots=True)
class PendingChange:
    partition: int
    email: str
    target: ListRef
    event: MembershipEvent
    raw: bytes | None
    offsets: list[int]  # of ``partition``: every record this change covers, in order
    first_seen: float
    due_at: float
    attempts: int = 0
    seq: int = field(default=0)
    force_single: bool = False  # AC refused it in an import: learn the exact error per contact
    plan: Plan = Plan.SKIP  # decided from the ledger when the change is handed out
    previous: ListState | None = None  # the ledger's state for the key at that moment
    contact_id: str | None = None  # learned by an exit's verification (for its unsubscribe)
    verified_at: float = 0.0  # when the exit's verification read said "still subscribed"
    failing_since: float | None = None  # first failure of the current attempt series
    # The Kafka headers of the record ``raw`` came from (None: it had none): parked with it, so
    # a redriven record that fails again carries its redrive history into the DLQ.
    headers: list[tuple[str, bytes]] | None = None

    @property
    def key(self) -> ChangeKey:
        # Built when asked (requeue, discard: rare), not stored: one object less per pending
        # change, and no __post_init__ call on the per-record path.
        return (self.partition, self.email, self.target)
