"""``reconcile`` reads a list's members page by page; a page read that AC answered with a 5xx
is retried with a new call (a call is a generator, used up by one attempt)."""

from __future__ import annotations

import json
from typing import Any

from service.app.cli_support import _members, _Progress
from service.core import acapi


def test_a_page_read_retried_after_a_5xx_sends_a_new_call() -> None:
    page = {"contacts": [{"id": "7", "email": "a@example.com"}], "meta": {"total": "1"}}
    replies = [
        acapi.Reply(502, "text/html", b"<html>Bad gateway</html>"),
        acapi.Reply(200, "application/json", json.dumps(page).encode()),
    ]
    sent: list[acapi.ApiCall] = []

    class Tool:
        def call(self, work: Any) -> Any:
            def send(call: acapi.ApiCall) -> acapi.Reply:
                sent.append(call)
                return replies.pop(0)

            return acapi.run_sync(work, send)

    assert _members(Tool(), "12", 1, _Progress("VIP")) == {"a@example.com": "7"}
    assert len(sent) == 2 and sent[0] == sent[1]  # the same request, asked twice
