"""A decoded record -> a validated ``MembershipEvent``: ``to_event``, and ``EmailCache``, the
validated emails remembered. Pure. ``codec.EventDecoder`` validates here every record that
fastavro read; ``fast_decode.read_event``, its fast path, checks the same (tested to give the
same answer) and normalises emails with ``EmailCache`` too.

Invariants:
- fields are validated: text fields (event id, audience id and name) not blank, ``occurred_at``
  within ``OCCURRED_AT_RANGE_MS``, the email by the rule in ``model``;
- a record that can never be applied raises ``PoisonMessage`` with one of ``codec.REASONS``
  (``missing_field``, ``invalid_field``, ``invalid_email``) naming what is wrong;
- ``EmailCache`` is bounded by bytes (cleared when full: a re-validation is only slower, never
  wrong), keeps no invalid email and no spelling longer than ``MAX_SPELLING``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from service.core.errors import PoisonMessage
from service.core.model import (
    MAX_EMAIL_LENGTH,
    NO_ATTRIBUTES,
    OCCURRED_AT_MAX_MS,
    OCCURRED_AT_MIN_MS,
    Action,
    MembershipEvent,
    checked_email,
    normalise_email,
    validated_email,
)

_ACTIONS = {a.value: a for a in Action}  # a dict lookup: Enum's __call__ is slow per record
_TEXT_FIELDS = ("event_id", "audience_id", "audience_name")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
# A spelling longer than this is never kept as a key (a valid email is at most 254 characters;
# the rest would be padding someone else chose).
MAX_SPELLING = MAX_EMAIL_LENGTH + 64
_ENTRY_BYTES = 112  # a key's str header and its dict slot, about (the key's characters on top)


class EmailCache(dict[str, str]):
    """Spelling -> normalised valid email, remembered: a CDP re-scores the same people over and
    over, and the regex is a tenth of the per-record cost. A dict whose ``__missing__``
    validates, so a hit (``cache[raw]``) runs no Python code at all.

    Keyed by the normalised email, so the regex runs once per address whatever its spellings;
    a spelling (case, surrounding spaces) is a key too when it is at most ``MAX_SPELLING``
    characters, so a record with a megabyte of padding keeps nothing of its padding. Bounded by
    bytes: the keys' characters plus ``_ENTRY_BYTES`` each stay under ``max_bytes``; cleared
    when full (a re-validation is only slower, never wrong). Invalid emails are not kept; they
    are rare and each raises ``PoisonMessage`` again."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.used = 0

    def __missing__(self, raw: str) -> str:
        # Runs for every first sighting of a spelling (a quarter of the benchmark's records):
        # written out, without helper calls.
        email = normalise_email(raw)
        found = self.get(email)
        cost = 0
        if found is None:
            found = checked_email(email)  # raises for an invalid one: nothing kept
            cost = len(found) + _ENTRY_BYTES
        spelled = raw != found and len(raw) <= MAX_SPELLING
        if spelled:
            cost += len(raw) + _ENTRY_BYTES
        if self.used + cost > self.max_bytes:
            self.clear()
            self.used = 0
            cost = len(found) + _ENTRY_BYTES + (len(raw) + _ENTRY_BYTES if spelled else 0)
        self[found] = found
        if spelled:
            self[raw] = found
        self.used += cost
        return found

    def __call__(self, raw: str) -> str:
        return self[raw]


def to_event(
    record: Mapping[str, Any], email_of: Callable[[str], str] = validated_email
) -> MembershipEvent:
    """Validate a decoded record dict into an event (the email normalised by ``email_of``).

    Runs once per consumed record, so the common case is written for speed: every field read by
    index (a record read with our schema has them all), exact type checks, positional
    construction. Anything unusual goes to ``_checked_event``, which names what is wrong.
    """
    try:
        event_id = record["event_id"]
        occurred = record["occurred_at"]
        raw_email = record["email"]
        audience_id = record["audience_id"].strip()
        audience_name = record["audience_name"].strip()
        action = _ACTIONS[record["action"]]
        campaign_id = record["campaign_id"]
        treatment_group = record["treatment_group"]
        attributes = record["attributes"]
    except (KeyError, TypeError, AttributeError):
        return _checked_event(record, email_of)
    if (
        type(event_id) is not str
        or type(raw_email) is not str
        or type(occurred) is not int
        or not OCCURRED_AT_MIN_MS <= occurred <= OCCURRED_AT_MAX_MS
        or type(audience_id) is not str
        or type(audience_name) is not str
        or not event_id
        or event_id.isspace()
        or not audience_id
        or not audience_name
    ):
        return _checked_event(record, email_of)
    # tuple.__new__ directly: the named tuple's own __new__ is a Python function per record.
    return _new_tuple(
        MembershipEvent,
        (
            event_id,
            occurred,
            email_of(raw_email),
            audience_id,
            audience_name,
            action,
            campaign_id,
            treatment_group,
            attributes or NO_ATTRIBUTES,
        ),
    )


_new_tuple = tuple.__new__


def _checked_event(record: Mapping[str, Any], email_of: Callable[[str], str]) -> MembershipEvent:
    """``to_event`` for records off the common path: each field checked, a clear reason."""
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise PoisonMessage("missing_field", f"{name} is empty")
    raw_email = record.get("email")
    if not isinstance(raw_email, str):
        raise PoisonMessage("missing_field", "email is missing")
    occurred = record.get("occurred_at")
    if isinstance(occurred, datetime):
        # Exact integer arithmetic (``timestamp() * 1000`` is a float: 1 ms off for 0.6 % of
        # values); a naive datetime (local-timestamp-millis) is taken as UTC.
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=UTC)
        occurred = (occurred - _EPOCH) // _MILLISECOND
    elif not isinstance(occurred, int) or isinstance(occurred, bool):
        raise PoisonMessage("missing_field", "occurred_at is missing")
    if not OCCURRED_AT_MIN_MS <= occurred <= OCCURRED_AT_MAX_MS:
        raise PoisonMessage(
            "invalid_field", "occurred_at is outside 2000-01-01..2100-01-01 (milliseconds, UTC)"
        )
    action = record.get("action")
    if not isinstance(action, str) or action not in _ACTIONS:
        raise PoisonMessage("missing_field", "action is not ENTERED or EXITED")
    return MembershipEvent(
        str(record["event_id"]),
        int(occurred),
        email_of(str(raw_email)),
        str(record["audience_id"]).strip(),
        str(record["audience_name"]).strip(),
        _ACTIONS[action],
        record.get("campaign_id"),
        record.get("treatment_group"),
        record.get("attributes") or NO_ATTRIBUTES,
    )
