"""The emulator over real sockets: AC's documented behaviour, checked against AC's OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from service.devtools.emulator.server import Emulator, emulator_token
from tests.conftest import TOKEN
from tests.support.openapi import ValidatingTransport


@pytest.fixture
def fast() -> Iterator[Emulator]:
    """An emulator with a high rate limit, for behaviour that is not about the limit."""
    emu = Emulator(tokens={TOKEN}, rate_limit=1000, import_delay=0.3, seed=3).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def validating() -> ValidatingTransport:
    return ValidatingTransport(httpx.HTTPTransport())


def client(
    emu: Emulator, transport: httpx.BaseTransport | None = None, token: str = TOKEN
) -> httpx.Client:
    return httpx.Client(
        base_url=emu.url + "/api/3/", headers={"Api-Token": token}, transport=transport, timeout=10
    )


def state(emu: Emulator) -> dict[str, Any]:
    return httpx.get(emu.url + "/_emulator/state", headers=emu.inspection_headers).json()  # type: ignore[no-any-return]


def make_list(c: httpx.Client, name: str) -> str:
    r = c.post(
        "lists",
        json={
            "list": {
                "name": name,
                "stringid": name.lower(),
                "sender_url": "https://x.io",
                "sender_reminder": "hi",
            }
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["list"]["id"])


def test_sixth_request_inside_one_second_gets_429(emulator: Emulator) -> None:
    with client(emulator) as c:
        statuses = [c.get("lists").status_code for _ in range(6)]
        assert statuses[:5] == [200] * 5
        assert statuses[5] == 429
        r = c.get("lists")
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert r.headers["RateLimit-Limit"] == "5"
        assert r.headers["RateLimit-Remaining"] == "0"
        time.sleep(1.05)
        assert c.get("lists").status_code == 200


def test_wrong_token_is_403(fast: Emulator) -> None:
    with client(fast, token="wrong") as c:
        assert c.get("lists").status_code == 403


def test_bad_token_html_login_page_fault(fast: Emulator) -> None:
    httpx.post(
        fast.url + "/_emulator/faults",
        json={"html_login_on_bad_token": True},
        headers=fast.inspection_headers,
    )
    with client(fast, token="wrong") as c:
        r = c.get("lists")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "Login" in r.text


def test_lists_require_fields_page_and_filter(
    fast: Emulator, validating: ValidatingTransport
) -> None:
    with client(fast) as plain:  # a deliberately invalid request: not through the validator
        r = plain.post("lists", json={"list": {"name": "No sender"}})
        assert r.status_code == 422
        assert r.json()["errors"][0]["code"] == "field_missing"
    with client(fast, validating) as c:
        for i in range(150):
            make_list(c, f"Audience {i}")
        page = c.get("lists", params={"limit": 100, "offset": 100}).json()
        assert len(page["lists"]) == 50
        assert page["meta"]["total"] == "150"
        found = c.get("lists", params={"filters[name]": "Audience 14"}).json()["lists"]
        # a contains match, as AC's: "Audience 14", "Audience 140".."149"
        assert {x["name"] for x in found} == {"Audience 14"} | {
            f"Audience 14{i}" for i in range(10)
        }
        dup = c.post(
            "lists",
            json={
                "list": {
                    "name": "x",
                    "stringid": "audience 1",
                    "sender_url": "https://x.io",
                    "sender_reminder": "r",
                }
            },
        )
        assert dup.status_code == 422
    assert validating.errors == []


def test_contact_sync_is_case_insensitive(fast: Emulator, validating: ValidatingTransport) -> None:
    with client(fast, validating) as c:
        r1 = c.post(
            "contact/sync", json={"contact": {"email": "Jane@Example.com", "firstName": "Jane"}}
        )
        r2 = c.post("contact/sync", json={"contact": {"email": "jane@example.COM"}})
        assert (r1.status_code, r2.status_code) == (201, 200)
        assert r1.json()["contact"]["id"] == r2.json()["contact"]["id"]
        bad = c.post("contact/sync", json={"contact": {"email": "nope"}})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["code"] == "email_invalid"
        found = c.get("contacts", params={"email": "JANE@example.com"}).json()["contacts"]
        assert [x["id"] for x in found] == [r1.json()["contact"]["id"]]
    assert validating.errors == []


def test_exclusion_list(fast: Emulator) -> None:
    httpx.post(
        fast.url + "/_emulator/exclusions",
        json={"emails": ["blocked@example.com"]},
        headers=fast.inspection_headers,
    )
    with client(fast) as c:
        r = c.post("contact/sync", json={"contact": {"email": "Blocked@example.com"}})
        assert r.status_code == 422
        assert r.json()["errors"][0]["code"] == "email_excluded"


def test_contact_lists_status(fast: Emulator, validating: ValidatingTransport) -> None:
    with client(fast, validating) as c:
        list_id = make_list(c, "VIP")
        contact = c.post("contact/sync", json={"contact": {"email": "a@example.com"}}).json()[
            "contact"
        ]["id"]
        assert (
            c.post(
                "contactLists",
                json={"contactList": {"list": list_id, "contact": contact, "status": "1"}},
            ).status_code
            == 200
        )
        assert state(fast)["lists"]["VIP"]["members"] == {"a@example.com": 1}
        assert (
            c.post(
                "contactLists",
                json={"contactList": {"list": list_id, "contact": contact, "status": "2"}},
            ).status_code
            == 200
        )
        rows = c.get(f"contacts/{contact}/contactLists").json()["contactLists"]
        assert [{k: r[k] for k in ("contact", "list", "status", "id")} for r in rows] == [
            {"contact": contact, "list": list_id, "status": "2", "id": f"{contact}-{list_id}"}
        ]
        # AC dates a membership's subscribe and unsubscribe (ISO 8601 with an offset)
        assert datetime.fromisoformat(rows[0]["udate"]).tzinfo is not None
        assert rows[0]["sdate"] is not None
        missing = c.post(
            "contactLists", json={"contactList": {"list": "999", "contact": contact, "status": "1"}}
        )
        assert missing.status_code == 422
    assert validating.errors == []
    with client(fast) as plain:
        assert (
            plain.post(
                "contactLists",
                json={"contactList": {"list": list_id, "contact": contact, "status": "3"}},
            ).status_code
            == 422
        )


def test_delete_contact_takes_its_memberships(
    fast: Emulator, validating: ValidatingTransport
) -> None:
    """``DELETE /contacts/{id}`` as AC's reference describes it: ``{}``, then 404 with a
    message; the contact's list memberships go with it, its email is free again."""
    with client(fast, validating) as c:
        list_id = make_list(c, "Erasable")
        synced = c.post("contact/sync", json={"contact": {"email": "Gone@Example.com"}})
        contact = synced.json()["contact"]["id"]
        c.post(
            "contactLists",
            json={"contactList": {"list": list_id, "contact": contact, "status": "1"}},
        )
        kept = c.post("contact/sync", json={"contact": {"email": "kept@example.com"}})
        assert state(fast)["lists"]["Erasable"]["members"] == {"gone@example.com": 1}
        deleted = c.delete(f"contacts/{contact}")
        assert (deleted.status_code, deleted.json()) == (200, {})
        assert c.get("contacts", params={"email": "gone@example.com"}).json()["contacts"] == []
        assert c.get(f"contacts/{contact}/contactLists").status_code == 404
        again = c.delete(f"contacts/{contact}")
        assert again.status_code == 404
        assert again.json() == {"message": f"No result found for contact with id {contact}"}
        new = c.post("contact/sync", json={"contact": {"email": "gone@example.com"}})
        assert new.status_code == 201
        assert new.json()["contact"]["id"] not in (contact, kept.json()["contact"]["id"])
    assert validating.errors == []
    assert validating.checked == 9  # every request and answer checked, the DELETEs included
    assert state(fast)["lists"]["Erasable"]["members"] == {}


def test_find_and_delete_contact_calls_through_the_tools_budget(fast: Emulator) -> None:
    """``acapi.find_contact`` / ``delete_contact`` as ``forget --delete-contact`` sends them."""
    from service.adapters.ac_http import AcTool
    from service.core import acapi

    with client(fast) as c:
        contact = c.post("contact/sync", json={"contact": {"email": "x@example.com"}}).json()[
            "contact"
        ]["id"]
    tool = AcTool(
        fast.url + "/api/3", lambda: TOKEN, rate=1000, guard=0.0, tools_every=0, timeout=5
    )
    try:
        assert tool.call(acapi.find_contact("x@example.com")) == contact
        assert tool.call(acapi.find_contact("nobody@example.com")) is None
        assert tool.call(acapi.delete_contact(contact)) is True
        assert tool.call(acapi.delete_contact(contact)) is False  # 404: already gone
        assert tool.call(acapi.find_contact("x@example.com")) is None
    finally:
        tool.close()
    log = httpx.get(fast.url + "/_emulator/requests", headers=fast.inspection_headers).json()
    assert [(r["method"], r["endpoint"], r["status"]) for r in log["requests"][-5:]] == [
        ("GET", "/contacts", 200),
        ("GET", "/contacts", 200),
        ("DELETE", "/contacts/{id}", 200),
        ("DELETE", "/contacts/{id}", 404),
        ("GET", "/contacts", 200),
    ]


def bulk(
    emails: list[str], subscribe: list[str] = (), unsubscribe: list[str] = ()
) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "contacts": [
            {
                "email": e,
                "subscribe": [{"listid": s} for s in subscribe],
                "unsubscribe": [{"listid": u} for u in unsubscribe],
            }
            for e in emails
        ]
    }


def wait_completed(c: httpx.Client, batch: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = c.get("import/info", params={"batchId": batch}).json()
        if info["status"] == "completed":
            return info  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("import never completed")


def test_bulk_import_is_asynchronous_and_reports(
    fast: Emulator, validating: ValidatingTransport
) -> None:
    httpx.post(
        fast.url + "/_emulator/exclusions",
        json={"emails": ["x3@example.com"]},
        headers=fast.inspection_headers,
    )
    with client(fast, validating) as c:
        list_id = make_list(c, "Imported")
        r = c.post(
            "import/bulk_import", json=bulk([f"x{i}@example.com" for i in range(5)], [list_id])
        )
        assert r.status_code == 200
        batch = r.json()["batchId"]
        early = c.get("import/info", params={"batchId": batch}).json()
        assert early["status"] is False  # AC answers false when asked too soon
        assert (
            "Imported" not in state(fast)["lists"]
            or not state(fast)["lists"]["Imported"]["members"]
        )
        info = wait_completed(c, batch)
        assert info["failure"] == ["x3@example.com"]
        assert len(info["success"]) == 4
    members = state(fast)["lists"]["Imported"]["members"]
    assert members == {f"x{i}@example.com": 1 for i in (0, 1, 2, 4)}


def test_import_rejects_251_contacts(fast: Emulator, validating: ValidatingTransport) -> None:
    with client(fast, validating) as c:
        r = c.post("import/bulk_import", json=bulk([f"p{i}@example.com" for i in range(251)]))
        assert r.status_code == 400
        assert r.json()["success"] == 0
        assert (
            c.post(
                "import/bulk_import", json=bulk([f"p{i}@example.com" for i in range(250)])
            ).status_code
            == 200
        )


def test_import_rejects_400000_bytes(fast: Emulator) -> None:
    contact = {"email": "big@example.com", "tags": ["t" * 1000] * 2}
    with client(fast) as c:
        r = c.post("import/bulk_import", json={"contacts": [contact] * 200})
        assert r.status_code == 400


def test_one_bad_email_rejects_the_whole_import(
    fast: Emulator, validating: ValidatingTransport
) -> None:
    with client(fast, validating) as c:
        r = c.post(
            "import/bulk_import",
            json=bulk(["ok@example.com", "broken-at-example", "ok2@example.com"]),
        )
        assert r.status_code == 400
        assert r.json()["failureReasons"] == [
            {"contact": 1, "failureReason": "Field 'email' incorrect format"}
        ]
        assert state(fast)["contacts"] == 0
    assert validating.errors == []


def test_import_never_resubscribes_an_unsubscribed_contact(fast: Emulator) -> None:
    with client(fast) as c:
        list_id = make_list(c, "News")
        contact = c.post("contact/sync", json={"contact": {"email": "gone@example.com"}}).json()[
            "contact"
        ]["id"]
        c.post(
            "contactLists",
            json={"contactList": {"list": list_id, "contact": contact, "status": "2"}},
        )
        batch = c.post(
            "import/bulk_import", json=bulk(["gone@example.com", "new@example.com"], [list_id])
        ).json()["batchId"]
        wait_completed(c, batch)
    assert state(fast)["lists"]["News"]["members"] == {"gone@example.com": 2, "new@example.com": 1}


def test_import_rate_limits_answer_400(fast: Emulator) -> None:
    with client(fast) as c:
        singles = [
            c.post("import/bulk_import", json=bulk([f"s{i}@example.com"])) for i in range(21)
        ]
        assert [r.status_code for r in singles[:20]] == [200] * 20
        assert singles[20].status_code == 400
        assert singles[20].json()["message"] == "Rate limit exceeded."
        multis = [
            c.post("import/bulk_import", json=bulk([f"m{i}@example.com", f"n{i}@example.com"]))
            for i in range(101)
        ]
        assert [r.status_code for r in multis[:100]] == [200] * 100
        assert multis[100].json()["message"] == "Rate limit exceeded."


def test_faults_5xx_and_request_log(fast: Emulator) -> None:
    httpx.post(
        fast.url + "/_emulator/faults",
        json={"error_5xx_ratio": 1.0},
        headers=fast.inspection_headers,
    )
    with client(fast) as c:
        assert c.get("lists").status_code in (500, 502, 503)
    log = httpx.get(fast.url + "/_emulator/requests", headers=fast.inspection_headers).json()[
        "requests"
    ]
    assert log[-1]["endpoint"] == "/lists"
    assert log[-1]["status"] >= 500


def test_fault_429_storm_with_long_retry_after(fast: Emulator) -> None:
    httpx.post(
        fast.url + "/_emulator/faults",
        json={"storm_429_ratio": 1.0, "storm_429_retry_after": 40, "storm_429_seconds": 30},
        headers=fast.inspection_headers,
    )
    with client(fast) as c:
        r = c.get("lists")
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "40"


def test_fault_latency_and_timeout(fast: Emulator) -> None:
    httpx.post(
        fast.url + "/_emulator/faults",
        json={"latency_ms": [200, 200]},
        headers=fast.inspection_headers,
    )
    with client(fast) as c:
        began = time.monotonic()
        c.get("lists")
        assert time.monotonic() - began >= 0.2
    httpx.post(
        fast.url + "/_emulator/faults",
        json={"timeout_ratio": 1.0, "timeout_seconds": 2},
        headers=fast.inspection_headers,
    )
    with client(fast) as c, pytest.raises(httpx.ReadTimeout):
        c.get("lists", timeout=0.5)


def test_unknown_fault_is_refused(fast: Emulator) -> None:
    assert (
        httpx.post(
            fast.url + "/_emulator/faults", json={"nonsense": 1}, headers=fast.inspection_headers
        ).status_code
        == 400
    )


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("GET", "state"),
        ("GET", "requests"),
        ("GET", "health"),
        ("POST", "faults"),
        ("POST", "exclusions"),
        ("POST", "self-unsubscribe"),
        ("POST", "reset"),
    ],
)
def test_inspection_routes_need_a_token(fast: Emulator, method: str, route: str) -> None:
    """The state holds every contact's email and the routes change the account."""
    url = f"{fast.url}/_emulator/{route}"
    for headers in ({}, {"Api-Token": "wrong"}, {"Api-Token": ""}):
        r = httpx.request(method, url, json={}, headers=headers)
        assert r.status_code == 403, (headers, r.text)
    allowed = httpx.request(method, url, json={}, headers={"Api-Token": TOKEN})
    assert allowed.status_code != 403


def test_inspection_works_while_the_api_refuses_every_token(fast: Emulator) -> None:
    """The auth_failure fault is about AC's routes; the tests must still read and undo it."""
    set_fault = httpx.post(
        fast.url + "/_emulator/faults", json={"auth_failure": True}, headers=fast.inspection_headers
    )
    assert set_fault.status_code == 200
    with client(fast) as c:
        assert c.get("lists").status_code == 403
    assert state(fast)["lists"] == {}
    httpx.post(fast.url + "/_emulator/faults", json={}, headers=fast.inspection_headers)
    with client(fast) as c:
        assert c.get("lists").status_code == 200


def test_the_emulator_token_is_explicit_never_ac_api_token() -> None:
    production = {"AC_API_TOKEN": "the-real-token"}
    assert emulator_token(None, production) is None
    assert emulator_token("", production) is None
    assert emulator_token(None, {**production, "EMULATOR_TOKEN": "emu"}) == "emu"
    assert emulator_token("cli", {**production, "EMULATOR_TOKEN": "emu"}) == "cli"
    for tokens in (set(), {""}):
        with pytest.raises(ValueError):
            Emulator(tokens=tokens)


def test_the_demo_gives_its_service_a_minimal_environment() -> None:
    """A shell's real credentials never reach the demo's service (issue 19, item 8)."""
    from service.devtools.demo import child_environment

    parent = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "AC_API_TOKEN": "the-real-token",
        "AC_API_TOKEN_FILE": "/var/run/secrets/token",
        "KAFKA_PROPERTY_SASL_PASSWORD": "secret",
        "SCHEMA_REGISTRY_URL": "https://registry.prod",
        "AWS_SECRET_ACCESS_KEY": "x",
    }
    env = child_environment(parent, {"AC_API_TOKEN": "demo-token", "KAFKA_TOPIC": "t"})
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "AC_API_TOKEN": "demo-token",
        "KAFKA_TOPIC": "t",
    }
