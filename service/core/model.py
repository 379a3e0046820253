"""Plain values that flow through the pipeline. All frozen; no I/O.

Invariants of every ``MembershipEvent`` (``codec`` refuses a record that would break one):
- ``email`` is normalised by ``normalise_email`` and valid by ``is_valid_email`` (the rule below);
- ``occurred_at_ms`` is within ``OCCURRED_AT_RANGE_MS`` (2000-01-01 to 2100-01-01, UTC);
- ``event_id``, ``audience_id`` and ``audience_name`` are not blank (the two ids trimmed);
- ``attributes`` has at most ``MAX_ATTRIBUTES`` entries.

Email identity (the event contract, README "The event contract"): an email is an ASCII string.
Surrounding ASCII whitespace (space, tab, CR, LF, VT, FF) is trimmed and ASCII letters
``A``-``Z`` are lower-cased, in the local part as in the domain (ActiveCampaign matches
addresses case-insensitively, so must every key we build). Nothing else is changed: a non-ASCII
character anywhere (including non-ASCII spaces around the address) makes the email invalid
(``invalid_email``), never "close enough" to an ASCII one. ``str.lower()`` alone would turn
``"\\u212aevin@b.co"`` (KELVIN SIGN) into ``"kevin@b.co"``, another person's address.
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

# 2000-01-01T00:00:00Z and 2100-01-01T00:00:00Z in milliseconds: a CDP's decision outside these
# is a producer bug (seconds or microseconds sent as milliseconds, a wrapped number), and
# downstream code (latency metrics, ``explain``'s dates) may rely on a sane value.
OCCURRED_AT_MIN_MS = 946_684_800_000
OCCURRED_AT_MAX_MS = 4_102_444_800_000
OCCURRED_AT_RANGE_MS = (OCCURRED_AT_MIN_MS, OCCURRED_AT_MAX_MS)
# Profile fields per event: AC contacts carry a few standard fields and custom ones; a bound
# keeps what one record can make the service hold (a pending change) a small multiple of its size.
MAX_ATTRIBUTES = 256
MAX_EMAIL_LENGTH = 254


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
# Every class is spelled out in ASCII (no ``\w``, no IGNORECASE), so only ASCII can match.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL_RE = re.compile(rf"{_LOCAL}@(?:{_LABEL}\.)+[A-Za-z]{{2,63}}")
_ASCII_SPACE = " \t\n\r\v\f"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalise_email(raw: str) -> str:
    """Trim surrounding ASCII whitespace and lower-case ASCII letters; leave everything else as
    it is (so ``is_valid_email`` refuses it). Total and idempotent."""
    email = raw.strip(_ASCII_SPACE)
    # On an ASCII string ``str.lower`` changes A-Z only; elsewhere it knows Unicode's rules.
    return email.lower() if email.isascii() else email.translate(_ASCII_LOWER)


def is_valid_email(email: str) -> bool:
    """True for a normalised email this service sends to AC: ASCII (the pattern's classes are
    ASCII only), at most 254 characters, ``local@domain`` with a conservative character set."""
    return len(email) <= MAX_EMAIL_LENGTH and _EMAIL_RE.fullmatch(email) is not None


def checked_email(email: str) -> str:
    """An email already normalised, returned if valid; ``PoisonMessage`` if AC would refuse it."""
    if not email:
        raise PoisonMessage("missing_field", "email is empty")
    if not is_valid_email(email):
        raise PoisonMessage("invalid_email", "email is not a valid address")
    return email


def validated_email(raw: str) -> str:
    """Normalise and validate an email; raise ``PoisonMessage`` for one AC would refuse."""
    return checked_email(normalise_email(raw))
