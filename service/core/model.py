"""Plain values that flow through the pipeline. All frozen; no I/O.

Invariant: ``MembershipEvent.email`` is normalised (trimmed, lower-cased) and syntactically valid.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from service.core.errors import PoisonMessage


class Action(enum.Enum):
    ENTERED = "ENTERED"
    EXITED = "EXITED"

    @property
    def status(self) -> int:
        """The AC contactList status that expresses this action: 1 subscribed, 2 unsubscribed."""
        return 1 if self is Action.ENTERED else 2


NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


# A NamedTuple, not a frozen dataclass: as immutable, but built and hashed in C. One is made per
# consumed record, so its cost shows in the decode-and-coalesce benchmark.
class MembershipEvent(NamedTuple):
    event_id: str
    occurred_at_ms: int
    email: str
    audience_id: str
    audience_name: str
    action: Action
    campaign_id: str | None = None
    treatment_group: str | None = None
    attributes: Mapping[str, str] = NO_ATTRIBUTES


# Deliberately conservative: AC rejects what its own validator dislikes, and we would rather
# park a doubtful address in the DLQ with a clear reason than have AC reject a whole import.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_RE = re.compile(rf"{_LOCAL}@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")


def normalise_email(raw: str) -> str:
    """Trim and lower-case; AC matches emails case-insensitively, so must every key we build."""
    return raw.strip().lower()


def is_valid_email(email: str) -> bool:
    return len(email) <= 254 and _EMAIL_RE.fullmatch(email) is not None


def validated_email(raw: str) -> str:
    """Normalise and validate an email; raise ``PoisonMessage`` for one AC would refuse."""
    email = normalise_email(raw)
    if not email:
        raise PoisonMessage("missing_field", "email is empty")
    if not is_valid_email(email):
        raise PoisonMessage("invalid_email", "email is not a valid address")
    return email
