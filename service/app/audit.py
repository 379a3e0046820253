"""``explain`` and ``reconcile``: answers for support, read from the ledger (and, for reconcile,
from AC through the rate limiter). Neither changes anything.

Pure parts: ``explain_lines``/``explain_json`` (an entry -> text or JSON) and ``differences``
(ledger states of one list vs AC's membership -> what differs and why).

Text for a terminal never carries what the data says raw: ids, names and emails come from
events and from AC, so every character that is not printable (control characters such as ESC,
which start terminal escape sequences, NUL, bidirectional overrides) is printed as a backslash
escape (``printable``). JSON output escapes them by itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from service.core.ledger import LedgerEntry, ListState, SetBy

STATUS_WORDS = {1: "subscribed", 2: "unsubscribed"}


def printable(text: object) -> str:
    """``text`` with every non-printable character as a Python-style backslash escape (so a
    terminal shows ``\\x1b[2J`` instead of clearing the screen); printable text is unchanged."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def quoted(text: object) -> str:
    """``printable`` in single quotes (for names)."""
    return "'" + printable(text) + "'"


def _time(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):  # a hostile or broken event time
        return f"{ms} ms since 1970 (out of range)"


def _why(state: ListState) -> str:
    if state.status == 1:
        return "subscribed by this service"
    if state.set_by is SetBy.SERVICE:
        return "unsubscribed by this service on an audience exit (reversible on re-entry)"
    if state.set_by is SetBy.PERSON:
        return (
            "unsubscribed by the person (or not by this service): kept, never re-subscribed "
            "(consent kept)"
        )
    if not state.verified:
        return (
            "an exit seen before this service ever subscribed them: nothing of ours to undo, "
            "nothing sent (AC's status is not ours)"
        )
    return "unsubscribed on an exit before this service had subscribed them: treated as theirs"


def _trust(state: ListState) -> str:
    if state.pending:
        statuses = " or ".join(STATUS_WORDS.get(s, str(s)) for s in sorted(state.pending_statuses))
        what = f"a write of ours ({statuses or 'an import'}) may or may not have landed"
        return f"uncertain: {what}; AC is read before anything else is sent"
    if state.status == 1 and not state.verified:
        return (
            "not verified: subscribed by an import, which never re-subscribes, so AC may show "
            "the person's own unsubscribe; AC is read before an exit is applied"
        )
    if state.status == 2 and state.set_by is SetBy.UNKNOWN and not state.verified:
        return "AC was not asked (nothing of ours there)"
    if state.status == 2 and state.set_by is SetBy.SERVICE and not state.verified:
        return "not verified as ours: a re-entry will not override it (treated as theirs)"
    return "verified"


def state_json(state: ListState, stale_tolerance_ms: int | None = None) -> dict[str, Any]:
    return {
        "list": state.list,
        "status": state.status,
        "status_name": STATUS_WORDS.get(state.status, str(state.status)),
        "set_by": state.set_by.name.lower(),
        "consent_kept": state.set_by is SetBy.PERSON,
        "why": _why(state),
        "event": {
            "event_id": state.event_id,
            "event_time": _time(state.event_time_ms),
            "audience_id": state.audience_id,
            "audience_name": state.audience_name,
            "campaign_id": state.campaign_id,
            "treatment_group": state.treatment_group,
            "source_partition": state.source_partition,
            "source_offset": state.source_offset,
        },
        "applied_at": _time(state.applied_at_ms),
        "verified": state.verified,
        "pending": sorted(state.pending_statuses) + (["import"] if state.pending_import else []),
        "trust": _trust(state),
        "stale_before": (
            None if stale_tolerance_ms is None else _time(state.event_time_ms - stale_tolerance_ms)
        ),
    }


def explain_json(
    email: str,
    entry: LedgerEntry | None,
    list_label: str | None,
    stale_tolerance_ms: int | None = None,
) -> dict[str, Any]:
    states = (
        []
        if entry is None
        else [
            s
            for s in entry.lists
            if list_label in (None, s.list) and entry.state(s.list) is not None
        ]
    )
    return {
        "email": email,
        "found": entry is not None,
        "contact_id": entry.contact_id if entry else None,
        "lists": [state_json(s, stale_tolerance_ms) for s in sorted(states, key=lambda s: s.list)],
    }


def explain_lines(
    email: str,
    entry: LedgerEntry | None,
    list_label: str | None,
    stale_tolerance_ms: int | None = None,
) -> list[str]:
    data = explain_json(email, entry, list_label, stale_tolerance_ms)
    who = printable(email)
    if entry is None:
        return [f"{who}: no ledger entry (this service has applied nothing for this email)"]
    contact = printable(data["contact_id"]) if data["contact_id"] else "unknown (imported)"
    lines = [f"{who}: AC contact id {contact}"]
    if not data["lists"]:
        lines.append(f"  no state recorded for list {quoted(list_label)}")
    for item in data["lists"]:
        event = item["event"]
        context = f"audience {quoted(event['audience_name'])} ({printable(event['audience_id'])})"
        if event["campaign_id"]:
            context += f", campaign {printable(event['campaign_id'])}"
        if event["treatment_group"]:
            context += f", treatment group {printable(event['treatment_group'])}"
        lines += [
            f"  list {quoted(item['list'])}: {item['status_name']} - {item['why']}",
            f"    event {printable(event['event_id'])} at {event['event_time']}: {context}",
            f"    applied at {item['applied_at']} "
            f"(source partition {event['source_partition']}, offset {event['source_offset']})",
            f"    {item['trust']}",
        ]
        if item["stale_before"] is not None:
            lines.append(
                f"    a change for this list that occurred before {item['stale_before']} is "
                "skipped as stale (STALE_EVENT_TOLERANCE_SECONDS)"
            )
    return lines


class Difference(NamedTuple):
    email: str
    ledger: str  # subscribed / unsubscribed / none
    ac: str  # subscribed / unsubscribed / absent
    meaning: str


def differences(
    label: str, entries: Mapping[str, LedgerEntry], ac_status: Mapping[str, int]
) -> list[Difference]:
    """Where AC's membership of one list disagrees with what the ledger says we set."""
    found: list[Difference] = []
    ledger: dict[str, ListState] = {}
    for email, entry in entries.items():
        state = entry.state(label)
        if state is not None:
            ledger[email] = state
    for email in sorted(set(ledger) | set(ac_status)):
        state = ledger.get(email)
        actual = ac_status.get(email)
        want = state.status if state else None
        if want == actual or (want == 2 and actual is None):
            continue
        ac_word = STATUS_WORDS.get(actual, "absent") if actual is not None else "absent"
        ledger_word = STATUS_WORDS[want] if want else "none"
        if state is not None and state.pending:
            meaning = (
                f"{ac_word} in AC while a write of ours is unconfirmed (a crash came between): "
                "the service reads AC before it sends anything else for this email"
            )
        elif want == 1 and actual == 2 and state is not None and not state.verified:
            meaning = (
                "unsubscribed in AC; the ledger's subscription came from an import (not "
                "verified), which never re-subscribes: an unsubscribe from before the import "
                "(theirs) or after it (theirs or a manual edit)"
            )
        elif want == 1 and actual == 2:
            meaning = (
                "unsubscribed in AC, not by this service (their own unsubscribe or a manual edit)"
            )
        elif want == 1:
            meaning = "not on the list in AC (removed, or the contact was deleted)"
        elif want == 2 and state is not None and state.set_by is SetBy.UNKNOWN:
            meaning = (
                "subscribed in AC, not by this service: it only saw an exit before it ever "
                "subscribed them (nothing of ours to undo)"
            )
        elif want == 2:
            meaning = "subscribed in AC, though the ledger says unsubscribed (a manual edit or their own re-subscribe)"
        else:
            meaning = f"{ac_word} in AC, never set by this service"
        found.append(Difference(email, ledger_word, ac_word, meaning))
    return found


def differences_json(label: str, found: list[Difference], ledger_count: int, ac_count: int) -> str:
    return json.dumps(
        {
            "list": label,
            "ledger_emails": ledger_count,
            "ac_members": ac_count,
            "differences": [d._asdict() for d in found],
        },
        indent=2,
    )
