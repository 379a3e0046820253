"""``explain``'s text never carries raw control characters from the data it prints."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from service.app.audit import explain_json, explain_lines, printable
from service.core.ledger import LedgerEntry, ListState, SetBy

ESC = "\x1b"


def hostile_entry() -> LedgerEntry:
    state = ListState(
        list=f"VIP{ESC}]0;owned\x07",
        status=1,
        set_by=SetBy.SERVICE,
        event_id=f"ev-1{ESC}[2J{ESC}[H",
        event_time_ms=1_700_000_000_000,
        applied_at_ms=1_700_000_000_500,
        source_partition=0,
        source_offset=7,
        audience_id="aud\x00-1\r",
        audience_name=f"Name\u202e{ESC}[31m",
        campaign_id=f"camp{ESC}[1m",
        treatment_group="B\x9b2J",
    )
    return LedgerEntry(f"42{ESC}[8m", 0, (state,))


def test_explain_text_escapes_every_control_character() -> None:
    text = "\n".join(explain_lines("a@example.com", hostile_entry(), None))
    assert not any(not c.isprintable() for line in text.splitlines() for c in line)
    for shown in (
        r"ev-1\x1b[2J\x1b[H",
        r"aud\x00-1\r",
        r"Name\u202e\x1b[31m",
        r"camp\x1b[1m",
        r"B\x9b2J",
        r"42\x1b[8m",
        r"VIP\x1b]0;owned\x07",
    ):
        assert shown in text, shown


def test_explain_json_escapes_too_and_keeps_the_data() -> None:
    out = json.dumps(explain_json("a@example.com", hostile_entry(), None), indent=2)
    assert ESC not in out and "\x00" not in out
    assert json.loads(out)["lists"][0]["event"]["event_id"] == f"ev-1{ESC}[2J{ESC}[H"


def test_an_event_time_out_of_range_does_not_crash_explain() -> None:
    state = hostile_entry().lists[0]._replace(event_time_ms=-(2**63))
    lines = explain_lines("a@example.com", LedgerEntry("1", 0, (state,)), None)
    assert "out of range" in "\n".join(lines)


@given(st.text())
def test_printable_is_printable_and_leaves_printable_text_alone(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    if text.isprintable():
        assert shown == text
