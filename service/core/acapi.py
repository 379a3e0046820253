"""ActiveCampaign v3 calls and answers, without I/O (sans-IO).

A call is a generator: it yields ``ApiCall`` values (what to send) and receives ``Reply``
values (what came back), and returns the parsed result or raises an ``ApiError``. Whoever
drives it owns the I/O: ``service/adapters/activecampaign.py`` sends over httpx through the
rate limiter (production); the simulation sends to the emulator's ``Account`` on virtual time.
So the code that decides what to ask AC, and what an answer means, is the same in both.

What an answer means (``classify_response``, the errors it raises, Retry-After) is decided in
``ac_responses.py``; ``answer`` applies it to a ``Reply``.
Nothing here ever holds the token or puts a raw email into an error message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from service.core.ac_responses import classify_response
from service.core.errors import ApiError, PermanentApiError, TransientApiError

PAGE_SIZE = 100  # AC's largest page for list endpoints
URGENT, NORMAL, BACKGROUND = 0, 1, 2  # the rate limiter serves waiters in this order
IDS_PER_READ = 100  # ``ids[]`` per request: one page answers them all

T = TypeVar("T")


@dataclass(frozen=True)
class ApiCall:
    """One request to send: ``path`` relative to ``.../api/3/``; ``endpoint`` is the route
    template used as a metric label (never an id or an email)."""

    method: str
    endpoint: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    body: Mapping[str, Any] | None = None
    priority: int = 1  # URGENT (imports) before NORMAL before BACKGROUND (learning ids)

    @property
    def urgent(self) -> bool:
        return self.priority == URGENT


@dataclass(frozen=True)
class Reply:
    """What came back: an HTTP answer, or ``failure`` (``timeout``, ``conn_error``,
    ``closed``: shutting down, ``cancelled``: the work's partition was revoked)."""

    status: int | None = None
    content_type: str = ""
    body: bytes = b""
    retry_after: str | None = None
    failure: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


Call = Generator[ApiCall, Reply, T]


def answer(call: ApiCall, reply: Reply, now_wall: float = 0.0) -> dict[str, Any]:
    """The JSON object of a successful reply, or the ``ApiError`` it means (raised)."""
    if reply.failure is not None:
        raise TransientApiError(None, reply.failure)
    assert reply.status is not None
    result = classify_response(
        reply.status, reply.content_type, reply.body, reply.retry_after, now_wall
    )
    if isinstance(result, ApiError):
        raise result
    return result


def request(call: ApiCall) -> Call[dict[str, Any]]:
    """Send one call; return its JSON object or raise its ``ApiError``."""
    reply = yield call
    return answer(call, reply)


def run_sync(call: Call[T], send: Any) -> T:
    """Drive ``call`` with a blocking ``send(ApiCall) -> Reply`` (tools, tests)."""
    try:
        step = next(call)
        while True:
            step = call.send(send(step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


# ---- lists ------------------------------------------------------------------------------------


def find_list(name: str) -> Call[str | None]:
    """The id of the list named exactly ``name`` (AC's filter is a contains match)."""
    offset = 0
    while True:
        page = yield from request(
            ApiCall(
                "GET",
                "/lists",
                "lists",
                (("filters[name]", name), ("limit", str(PAGE_SIZE)), ("offset", str(offset))),
            )
        )
        lists = page.get("lists") or []
        for item in lists:
            if isinstance(item, dict) and item.get("name") == name:
                return str(item["id"])
        if len(lists) < PAGE_SIZE:
            return None
        offset += PAGE_SIZE


def list_exists(list_id: str) -> Call[bool]:
    """Does the list still exist (``GET /lists/{id}``)? A 404 says no."""
    try:
        yield from request(ApiCall("GET", "/lists/{id}", f"lists/{list_id}"))
    except PermanentApiError as error:
        if error.status == 404:
            return False
        raise
    return True


def create_list(name: str, stringid: str, sender_url: str, sender_reminder: str) -> Call[str]:
    body = {
        "list": {
            "name": name,
            "stringid": stringid,
            "sender_url": sender_url,
            "sender_reminder": sender_reminder,
        }
    }
    created = yield from request(ApiCall("POST", "/lists", "lists", body=body))
    return str(created["list"]["id"])


# ---- contacts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Synced:
    """A ``contact/sync`` answer: the contact's id, and whether AC created it (201; 200 is an
    update). A contact created just now is on no list, so nothing needs reading about it."""

    contact_id: str
    created: bool


def sync_contact(email: str, fields: Mapping[str, str], custom: Mapping[str, str]) -> Call[Synced]:
    contact: dict[str, Any] = {"email": email, **fields}
    if custom:
        contact["fieldValues"] = [{"field": k, "value": v} for k, v in custom.items()]
    call = ApiCall("POST", "/contact/sync", "contact/sync", body={"contact": contact})
    reply = yield call
    synced = answer(call, reply)
    return Synced(str(synced["contact"]["id"]), reply.status == 201)


def find_contact(email: str) -> Call[str | None]:
    """The id of the contact with ``email`` (normalised; AC matches case-insensitively), or
    None when AC has none (``GET /contacts?email=``)."""
    page = yield from contacts_page(email=email, limit=1)
    return page.contacts.get(email)


def delete_contact(contact_id: str) -> Call[bool]:
    """Delete a contact (``DELETE /contacts/{id}``): its list memberships go with it. False
    when AC has no contact with that id (404: deleted meanwhile)."""
    try:
        yield from request(ApiCall("DELETE", "/contacts/{id}", f"contacts/{contact_id}"))
    except PermanentApiError as error:
        if error.status == 404:
            return False
        raise
    return True


@dataclass(frozen=True)
class Membership:
    status: int
    unsubscribed_at: float | None  # AC's ``udate`` (to the second), epoch seconds


def contact_lists(contact_id: str) -> Call[dict[str, Membership]]:
    """List id -> membership (status and when it was last unsubscribed) for one contact."""
    found = yield from request(
        ApiCall("GET", "/contacts/{id}/contactLists", f"contacts/{contact_id}/contactLists")
    )
    result: dict[str, Membership] = {}
    for row in found.get("contactLists") or []:
        if not isinstance(row, dict):
            continue
        try:
            status = int(row["status"])
        except (KeyError, TypeError, ValueError):
            continue
        result[str(row.get("list"))] = Membership(status, _ac_time(row.get("udate")))
    return result


def memberships(
    email: str, contact_id: str | None
) -> Call[tuple[str | None, dict[str, Membership]]]:
    """A contact's id and list memberships, by its id when known (looked up by email otherwise;
    never created). (None, {}) when AC has no such contact."""
    if contact_id is None:
        found = yield from contacts_page(email=email, limit=1)
        contact_id = found.contacts.get(email)
        if contact_id is None:
            return None, {}
    try:
        lists = yield from contact_lists(contact_id)
    except PermanentApiError as error:
        if error.status != 404:
            raise
        found = yield from contacts_page(email=email, limit=1)  # the id changed: look it up
        contact_id = found.contacts.get(email)
        if contact_id is None:
            return None, {}
        lists = yield from contact_lists(contact_id)
    return contact_id, lists


def _ac_time(value: Any) -> float | None:
    """An AC timestamp (ISO 8601 with an offset, or "YYYY-MM-DD HH:MM:SS") in epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace(" ", "T"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None  # no offset: which zone is unknown, so it proves nothing
    return parsed.timestamp()


def set_list_status(contact_id: str, list_id: str, status: int) -> Call[None]:
    body = {"contactList": {"list": list_id, "contact": contact_id, "status": str(status)}}
    yield from request(ApiCall("POST", "/contactLists", "contactLists", body=body))


@dataclass(frozen=True)
class Page:
    """One page of contacts: normalised email -> contact id, and AC's total (-1: unknown)."""

    contacts: dict[str, str]
    total: int
    last_id: int  # the largest id on the page (keyset paging), -1 when empty


def contacts_page(
    *,
    list_id: str | None = None,
    status: int | None = None,
    ids: Sequence[str] = (),
    email: str | None = None,
    id_greater: int | None = None,
    limit: int = PAGE_SIZE,
    priority: int = NORMAL,
) -> Call[Page]:
    """``GET /contacts`` filtered by list and status, by ``ids[]`` and/or by email, ordered by
    id (keyset paging with ``id_greater``: stable while the set changes between pages)."""
    params: list[tuple[str, str]] = []
    if list_id is not None:
        params.append(("listid", list_id))
    if status is not None:
        params.append(("status", str(status)))
    params += [("ids[]", i) for i in ids]
    if email is not None:
        params.append(("email", email))
    if id_greater is not None:
        params.append(("id_greater", str(id_greater)))
    params += [("orders[id]", "ASC"), ("limit", str(limit))]
    page = yield from request(
        ApiCall("GET", "/contacts", "contacts", tuple(params), priority=priority)
    )
    found: dict[str, str] = {}
    last = -1
    contacts = page.get("contacts") or []
    for item in contacts:
        if isinstance(item, dict) and item.get("email") and item.get("id") is not None:
            found[str(item["email"]).strip().lower()] = str(item["id"])
            with contextlib.suppress(TypeError, ValueError):
                last = max(last, int(item["id"]))
    meta = page.get("meta")
    try:
        total = int(meta["total"]) if isinstance(meta, dict) else -1
    except (KeyError, TypeError, ValueError):
        total = -1
    return Page(found, total, last)


def members(list_id: str, status: int, *, max_pages: int = 100_000) -> Call[dict[str, str]]:
    """Every contact with ``status`` on a list (email -> id), by keyset pages of 100."""
    result: dict[str, str] = {}
    after: int | None = None
    for _ in range(max_pages):
        page = yield from contacts_page(list_id=list_id, status=status, id_greater=after)
        result.update(page.contacts)
        if len(page.contacts) < PAGE_SIZE or page.last_id < 0:
            return result
        after = page.last_id
    raise TransientApiError(None, "list too long to read")


# ---- bulk import ------------------------------------------------------------------------------


def bulk_import(payload: Mapping[str, Any]) -> Call[str]:
    # Urgent: imports are the scarce resource (100 a minute); reads can wait a slot.
    queued = yield from request(
        ApiCall("POST", "/import/bulk_import", "import/bulk_import", body=payload, priority=URGENT)
    )
    batch = queued.get("batchId")
    if not isinstance(batch, str | int) or not str(batch):
        raise TransientApiError(200, "bulk_import answered without a batchId")
    return str(batch)


@dataclass(frozen=True)
class ImportStatus:
    completed: bool
    success_ids: list[str]
    failed_emails: list[str]


def import_info(batch_id: str) -> Call[ImportStatus]:
    info = yield from request(
        # Urgent, like the import itself: behind a burst of imports a poll would otherwise wait
        # for the whole burst, and the drain's last confirmations (its commit) with it.
        ApiCall("GET", "/import/info", "import/info", (("batchId", batch_id),), priority=URGENT)
    )
    if info.get("status") != "completed":
        return ImportStatus(False, [], [])
    return ImportStatus(
        True,
        [str(i) for i in info.get("success") or []],
        [str(e) for e in info.get("failure") or []],
    )


def imports_outstanding() -> Call[int]:
    """How many import batches AC still has to process, account-wide
    (``GET /import/bulk_import``: ``outstanding`` per day)."""
    summary = yield from request(ApiCall("GET", "/import/bulk_import", "import/bulk_import"))
    total = 0
    for row in summary.get("outstanding") or []:
        if isinstance(row, dict):
            try:
                total += int(row.get("batches") or 0)
            except (TypeError, ValueError):
                raise TransientApiError(200, "unreadable import summary") from None
    return total
