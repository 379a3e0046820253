"""The emulated ActiveCampaign account: data, limits and faults. No sockets here.

Every method takes ``now`` (seconds, monotonic) so tests can drive it exactly. The HTTP layer in
``server.py`` holds one ``Account`` behind a lock and translates requests into ``handle`` calls.

Behaviour copied from AC's documentation (see ``shared/activecampaign/api-notes.md``):
- 5 requests per second per account over all endpoints (sliding one-second window of accepted
  requests); beyond it 429 with ``Retry-After`` and ``RateLimit-Limit``/``RateLimit-Remaining``;
- a wrong token is 403 (or, as a fault, 200 with an HTML login page);
- bulk import: <= 250 contacts, < 400000 bytes, one bad email rejects the whole request with 400
  and ``failureReasons``; 100 multi-contact or 20 single-contact imports a minute, answered with
  400 "Rate limit exceeded."; processed asynchronously after ``import_delay``; an import never
  re-subscribes a contact that is unsubscribed from the list; excluded emails are failures.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from service.core.model import is_valid_email, normalise_email

MAX_IMPORT_CONTACTS = 250
MAX_IMPORT_BYTES = 400_000
IMPORT_MULTI_PER_MINUTE = 100
IMPORT_SINGLE_PER_MINUTE = 20


def _ac_time(now: float) -> str:
    """AC's timestamps: ISO 8601 to the second, with the account's UTC offset (here UTC)."""
    return datetime.fromtimestamp(math.floor(now), UTC).isoformat()


LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>Login | ActiveCampaign</title></head>"
    "<body><form action='/admin/index.php'><input name='user'><input name='pass'></form></body></html>"
)


@dataclass
class Faults:
    """Fault injection, set through ``POST /_emulator/faults``."""

    latency_min: float = 0.0
    latency_max: float = 0.0
    error_5xx_ratio: float = 0.0
    timeout_ratio: float = 0.0
    timeout_seconds: float = 5.0
    storm_429_ratio: float = 0.0
    storm_429_retry_after: int = 30
    storm_429_until: float = 0.0
    html_login_on_bad_token: bool = False
    auth_failure: bool = False  # every request refused as if the token were revoked
    import_stuck_ratio: float = 0.0  # share of imports that stay "processing" for good
    import_info_404_ratio: float = 0.0  # share of import/info answers that forget the batch
    redirect: bool = False  # every request answered 301 to https (a wrong AC_API_URL)


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    html: str | None = None
    delay: float = 0.0  # seconds the server waits before answering (latency, timeouts)


@dataclass
class LoggedRequest:
    t: float
    method: str
    endpoint: str
    status: int


@dataclass
class ImportBatch:
    batch_id: str
    queued_at: float
    contacts: list[dict[str, Any]]
    status: str = "queued"
    success: list[str] = field(default_factory=list)
    failure: list[str] = field(default_factory=list)
    stuck: bool = False


def _error(status: int, code: str, title: str, pointer: str = "") -> Response:
    return Response(
        status,
        {"errors": [{"title": title, "detail": "", "code": code, "source": {"pointer": pointer}}]},
    )


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/api/3/lists"), "/lists"),
    ("GET", re.compile(r"/api/3/lists/(\d+)"), "/lists/{id}"),
    ("POST", re.compile(r"/api/3/lists"), "/lists"),
    ("POST", re.compile(r"/api/3/contact/sync"), "/contact/sync"),
    ("GET", re.compile(r"/api/3/contacts"), "/contacts"),
    ("DELETE", re.compile(r"/api/3/contacts/(\d+)"), "/contacts/{id}"),
    ("GET", re.compile(r"/api/3/contacts/(\d+)/contactLists"), "/contacts/{id}/contactLists"),
    ("POST", re.compile(r"/api/3/contactLists"), "/contactLists"),
    ("POST", re.compile(r"/api/3/import/bulk_import"), "/import/bulk_import"),
    ("GET", re.compile(r"/api/3/import/bulk_import"), "/import/bulk_import"),
    ("GET", re.compile(r"/api/3/import/info"), "/import/info"),
]


class Account:
    """One AC account. Not thread-safe by itself; ``server.py`` serialises access."""

    def __init__(
        self,
        tokens: set[str],
        *,
        rate_limit: float = 5.0,
        import_delay: float = 2.0,
        seed: int | None = None,
    ) -> None:
        self.tokens = tokens
        self.rate_limit = rate_limit
        self.import_delay = import_delay
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        # The time of the account's own clock (wall seconds; the simulation sets virtual time).
        self.clock: Callable[[], float] = time.time
        self.reset()

    def reset(self) -> None:
        self.lists: dict[str, dict[str, Any]] = {}
        self.contacts: dict[str, dict[str, Any]] = {}
        self.email_index: dict[str, str] = {}
        # (contact id, list id) -> {"status": int, "by": "api" | "import" | "self"}
        self.memberships: dict[tuple[str, str], dict[str, Any]] = {}
        self.exclusions: set[str] = set()
        self.imports: dict[str, ImportBatch] = {}
        self.log: list[LoggedRequest] = []
        self._window: deque[float] = deque()
        self._imports_multi: deque[float] = deque()
        self._imports_single: deque[float] = deque()
        self._next_id = 1
        self.faults = Faults()

    def _set_membership(
        self, contact_id: str, list_id: str, status: int, by: str, now: float
    ) -> None:
        """AC keeps when a membership was subscribed (``sdate``) and unsubscribed (``udate``),
        to the second, in the account's time zone."""
        row = self.memberships.setdefault((contact_id, list_id), {"sdate": None, "udate": None})
        if status == 1 and row.get("status") != 1:
            row["sdate"] = _ac_time(now)
        if status == 2 and row.get("status") != 2:
            row["udate"] = _ac_time(now)
        row["status"] = status
        row["by"] = by

    def _new_id(self) -> str:
        value = str(self._next_id)
        self._next_id += 1
        return value

    # ---- the request pipeline -------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        now: float,
    ) -> Response:
        """Answer one API request arriving at ``now``."""
        self.process_imports(now)
        route = self._route(method, path)
        endpoint = route[1] if route else path
        response = self._handle(method, route, query, headers, body, now)
        self.log.append(LoggedRequest(now, method, endpoint, response.status))
        return response

    def _route(self, method: str, path: str) -> tuple[re.Match[str], str] | None:
        for route_method, pattern, endpoint in _ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return match, endpoint
        return None

    def _handle(
        self,
        method: str,
        route: tuple[re.Match[str], str] | None,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        now: float,
    ) -> Response:
        token = headers.get("api-token", "")
        if self.faults.redirect:
            return Response(
                301, {"message": "Moved Permanently"}, {"Location": "https://elsewhere"}
            )
        if token not in self.tokens or self.faults.auth_failure:
            if self.faults.html_login_on_bad_token:
                return Response(200, html=LOGIN_PAGE)
            return Response(403, {"message": "No Result found for Subscriber with id 0"})

        limited = self._rate_limited(now)
        if limited is not None:
            return limited
        faults = self.faults
        latency = (
            self.rng.uniform(faults.latency_min, faults.latency_max) if faults.latency_max else 0.0
        )
        if now < faults.storm_429_until and self.rng.random() < faults.storm_429_ratio:
            retry = str(faults.storm_429_retry_after)
            return Response(429, {"message": "Too Many Requests"}, {"Retry-After": retry})
        if self.rng.random() < faults.error_5xx_ratio:
            status = self.rng.choice([500, 502, 503])
            return Response(status, html="<html><body>Server Error</body></html>", delay=latency)
        if route is None:
            return Response(404, {"message": "Not Found"}, delay=latency)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            return Response(400, {"message": "Request body is not valid JSON"}, delay=latency)
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        match, endpoint = route
        handler = getattr(
            self, "_" + method.lower() + endpoint.replace("/", "_").replace("{id}", "id")
        )
        if endpoint == "/contacts" and method == "GET":
            response: Response = self._get_contacts(match, params, payload, len(body), now, query)
        else:
            response = handler(match, params, payload, len(body), now)
        response.delay += latency
        if self.rng.random() < faults.timeout_ratio:
            # The work is done but the answer never arrives in time: the hardest case for clients.
            response.delay += faults.timeout_seconds
        return response

    def _rate_limited(self, now: float) -> Response | None:
        window = self._window
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.rate_limit:
            retry_after = max(1, math.ceil(window[0] + 1.0 - now))
            return Response(
                429,
                {"message": "Too Many Requests"},
                {
                    "Retry-After": str(retry_after),
                    "RateLimit-Limit": f"{self.rate_limit:g}",
                    "RateLimit-Remaining": "0",
                },
            )
        window.append(now)
        return None

    # ---- lists -------------------------------------------------------------------------------

    def _get_lists(
        self, _m: Any, params: dict[str, str], _p: Any, _n: int, _now: float
    ) -> Response:
        try:
            limit = min(max(int(params.get("limit", "20")), 1), 100)
            offset = max(int(params.get("offset", "0")), 0)
        except ValueError:
            return Response(400, {"message": "limit and offset must be numbers"})
        wanted = params.get("filters[name]")
        # AC's name filter is a "contains" match: callers must check names exactly themselves.
        found = [
            lst
            for lst in self.lists.values()
            if wanted is None or wanted.lower() in lst["name"].lower()
        ]
        page = found[offset : offset + limit]
        return Response(200, {"lists": page, "meta": {"total": str(len(found))}})

    def _get_lists_id(
        self, match: re.Match[str], _q: Any, _p: Any, _n: int, _now: float
    ) -> Response:
        record = self.lists.get(match.group(1))
        if record is None:
            return Response(404, {"message": f"No Result found for List with id {match.group(1)}"})
        return Response(200, {"list": record})

    def delete_list(self, name: str) -> bool:
        """An operator deletes a list in AC's interface: its memberships go with it."""
        list_id = next((i for i, lst in self.lists.items() if lst["name"] == name), None)
        if list_id is None:
            return False
        del self.lists[list_id]
        for key in [k for k in self.memberships if k[1] == list_id]:
            del self.memberships[key]
        return True

    def _post_lists(self, _m: Any, _q: Any, payload: Any, _n: int, now: float) -> Response:
        data = payload.get("list") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            return _error(
                422, "field_missing", "The list field is missing", "/data/attributes/list"
            )
        for name in ("name", "stringid", "sender_url", "sender_reminder"):
            if not isinstance(data.get(name), str) or not data[name].strip():
                return _error(
                    422, "field_missing", f"The {name} field is missing", f"/data/attributes/{name}"
                )
        if any(lst["stringid"] == data["stringid"] for lst in self.lists.values()):
            return _error(
                422, "duplicate", "The stringid is already in use", "/data/attributes/stringid"
            )
        list_id = self._new_id()
        record = {
            "id": list_id,
            "name": data["name"],
            "stringid": data["stringid"],
            "sender_url": data["sender_url"],
            "sender_reminder": data["sender_reminder"],
            "cdate": f"{now:.3f}",
        }
        self.lists[list_id] = record
        return Response(201, {"list": record})

    # ---- contacts ----------------------------------------------------------------------------

    def _upsert_contact(self, data: Mapping[str, Any]) -> tuple[str, bool]:
        key = normalise_email(str(data["email"]))
        contact_id = self.email_index.get(key)
        created = contact_id is None
        if contact_id is None:
            contact_id = self._new_id()
            self.email_index[key] = contact_id
            self.contacts[contact_id] = {"id": contact_id, "email": str(data["email"]).strip()}
        contact = self.contacts[contact_id]
        for name in ("firstName", "lastName", "phone"):
            if isinstance(data.get(name), str):
                contact[name] = data[name]
        values = data.get("fieldValues")
        if isinstance(values, list):
            stored = contact.setdefault("fields", {})
            for item in values:
                if isinstance(item, dict) and "field" in item:
                    stored[str(item["field"])] = str(item.get("value", ""))
        return contact_id, created

    def _contact_view(self, contact_id: str) -> dict[str, Any]:
        contact = self.contacts[contact_id]
        return {
            "id": contact_id,
            "email": contact["email"],
            "firstName": contact.get("firstName", ""),
            "lastName": contact.get("lastName", ""),
            "phone": contact.get("phone", ""),
        }

    def _post_contact_sync(self, _m: Any, _q: Any, payload: Any, _n: int, _now: float) -> Response:
        data = payload.get("contact") if isinstance(payload, dict) else None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("email"), str)
            or not data["email"]
        ):
            return _error(
                422, "field_missing", "Email address is required", "/data/attributes/email"
            )
        email = normalise_email(data["email"])
        if not is_valid_email(email):
            return _error(
                422, "email_invalid", "Email address is not valid", "/data/attributes/email"
            )
        if email in self.exclusions:
            return _error(
                422,
                "email_excluded",
                "This email address is on the exclusion list",
                "/data/attributes/email",
            )
        contact_id, created = self._upsert_contact(data)
        return Response(
            201 if created else 200, {"contact": self._contact_view(contact_id), "fieldValues": []}
        )

    def _get_contacts(
        self, _m: Any, params: dict[str, str], _p: Any, _n: int, _now: float, query: str = ""
    ) -> Response:
        """``email=`` finds one; ``listid=`` with ``status=`` filters by list membership,
        ``ids[]=`` (repeated) by id; ``limit`` (default 20, at most 100) and ``offset`` page."""
        email = params.get("email")
        if email is not None:
            found = self.email_index.get(normalise_email(email))
            ids = [found] if found else []
        else:
            ids = list(self.contacts)
        wanted = parse_qs(query).get("ids[]")
        if wanted is not None:
            allowed = set(wanted)
            ids = [i for i in ids if i in allowed]
        list_id = params.get("listid")
        if list_id is not None:
            try:
                status = int(params.get("status", "-1"))
            except ValueError:
                return _error(400, "invalid", "status must be an integer")
            ids = [
                i
                for i in ids
                if (i, list_id) in self.memberships
                and (status == -1 or self.memberships[(i, list_id)]["status"] == status)
            ]
        greater = params.get("id_greater")
        if greater is not None:
            try:
                floor = int(greater)
            except ValueError:
                return _error(400, "invalid", "id_greater must be an integer")
            ids = [i for i in ids if int(i) > floor]
        if params.get("orders[id]", "").upper() in ("ASC", "DESC"):
            ids.sort(key=int, reverse=params["orders[id]"].upper() == "DESC")
        total = len(ids)
        try:
            limit = min(max(int(params.get("limit", "20")), 1), 100)
            offset = max(int(params.get("offset", "0")), 0)
        except ValueError:
            return _error(400, "invalid", "limit and offset must be integers")
        page = ids[offset : offset + limit]
        return Response(
            200,
            {"contacts": [self._contact_view(i) for i in page], "meta": {"total": str(total)}},
        )

    def _delete_contacts_id(
        self, match: re.Match[str], _q: Any, _p: Any, _n: int, _now: float
    ) -> Response:
        """AC deletes the contact and everything attached to it (its list memberships);
        ``{}`` on success, 404 with a message when there is no such contact."""
        contact_id = match.group(1)
        contact = self.contacts.pop(contact_id, None)
        if contact is None:
            return Response(404, {"message": f"No result found for contact with id {contact_id}"})
        self.email_index.pop(normalise_email(contact["email"]), None)
        for key in [k for k in self.memberships if k[0] == contact_id]:
            del self.memberships[key]
        return Response(200, {})

    def _get_contacts_id_contactLists(
        self, match: re.Match[str], _q: Any, _p: Any, _n: int, _now: float
    ) -> Response:
        contact_id = match.group(1)
        if contact_id not in self.contacts:
            return Response(
                404, {"message": f"No Result found for Subscriber with id {contact_id}"}
            )
        rows = [
            {
                "contact": cid,
                "list": lid,
                "status": str(m["status"]),
                "sdate": m.get("sdate"),
                "udate": m.get("udate"),
                "id": f"{cid}-{lid}",
            }
            for (cid, lid), m in self.memberships.items()
            if cid == contact_id
        ]
        return Response(200, {"contactLists": rows})

    def _post_contactLists(self, _m: Any, _q: Any, payload: Any, _n: int, _now: float) -> Response:
        data = payload.get("contactList") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            return _error(422, "field_missing", "The contactList field is missing")
        list_id, contact_id, status = (str(data.get(k, "")) for k in ("list", "contact", "status"))
        if status not in ("1", "2"):
            return _error(422, "field_invalid", "Status must be 1 or 2", "/data/attributes/status")
        if list_id not in self.lists:
            return _error(
                422, "related_missing", "The related list does not exist", "/data/attributes/list"
            )
        if contact_id not in self.contacts:
            return _error(
                422,
                "related_missing",
                "The related contact does not exist",
                "/data/attributes/contact",
            )
        self._set_membership(contact_id, list_id, int(status), "api", _now)
        row = {
            "contact": contact_id,
            "list": list_id,
            "status": int(status),
            "id": f"{contact_id}-{list_id}",
        }
        return Response(200, {"contacts": [self._contact_view(contact_id)], "contactList": row})

    # ---- bulk import -------------------------------------------------------------------------

    def _post_import_bulk_import(
        self, _m: Any, _q: Any, payload: Any, size: int, now: float
    ) -> Response:
        contacts = payload.get("contacts") if isinstance(payload, dict) else None
        if not isinstance(contacts, list) or not contacts:
            return Response(
                400,
                {"success": 0, "message": "'contacts' is a required field.", "failureReasons": []},
            )
        if len(contacts) > MAX_IMPORT_CONTACTS:
            return Response(
                400,
                {
                    "success": 0,
                    "message": "JSON payload did not pass validation. The import was not queued for processing.",
                    "failureReasons": [
                        f"Up to {MAX_IMPORT_CONTACTS} contacts may be imported per request."
                    ],
                },
            )
        if size >= MAX_IMPORT_BYTES:
            return Response(
                400,
                {
                    "success": 0,
                    "message": "JSON payload did not pass validation. The import was not queued for processing.",
                    "failureReasons": ["The payload must be smaller than 400000 bytes."],
                },
            )
        single = len(contacts) == 1
        window, limit = (
            (self._imports_single, IMPORT_SINGLE_PER_MINUTE)
            if single
            else (self._imports_multi, IMPORT_MULTI_PER_MINUTE)
        )
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= limit:
            return Response(
                400,
                {
                    "success": 0,
                    "message": "Rate limit exceeded.",
                    "failureReasons": [
                        f"Up to {limit} imports may be requested per minute.Please batch contacts into "
                        "larger requests, or retry this request in a minute."
                    ],
                },
            )
        failures = [
            {"contact": index, "failureReason": "Field 'email' incorrect format"}
            for index, contact in enumerate(contacts)
            if not isinstance(contact, dict)
            or not isinstance(contact.get("email"), str)
            or not is_valid_email(normalise_email(contact["email"]))
        ]
        if failures:
            return Response(
                400,
                {
                    "success": 0,
                    "message": "JSON payload did not pass validation. Please fix failure Reasons and retry. "
                    "The import was not queued for processing.",
                    "failureReasons": failures,
                },
            )
        window.append(now)
        batch = ImportBatch(str(uuid.UUID(int=self.rng.getrandbits(128))), now, contacts)
        batch.stuck = self.rng.random() < self.faults.import_stuck_ratio
        self.imports[batch.batch_id] = batch
        return Response(
            200,
            {
                "success": 1,
                "queued_contacts": len(contacts),
                "batchId": batch.batch_id,
                "message": "Contact import queued",
            },
        )

    def _get_import_info(
        self, _m: Any, params: dict[str, str], _p: Any, _n: int, now: float
    ) -> Response:
        batch_id = params.get("batchId")
        if not batch_id:
            return Response(400, {"success": 0, "message": "'batchId' is a required field."})
        batch = self.imports.get(batch_id)
        if batch is None or self.rng.random() < self.faults.import_info_404_ratio:
            return Response(404, {"message": f"No Result found for Import with id {batch_id}"})
        if batch.status != "completed":
            # AC answers ``status: false`` when asked too early; later it is still not a result.
            return Response(200, {"status": False if now - batch.queued_at < 1.0 else "processing"})
        return Response(
            200, {"status": "completed", "success": batch.success, "failure": batch.failure}
        )

    def _get_import_bulk_import(self, _m: Any, _q: Any, _p: Any, _n: int, now: float) -> Response:
        """The status list: batches and contacts still to process, and recently completed,
        per day (AC's shape: counts as strings)."""
        outstanding = [b for b in self.imports.values() if b.status != "completed"]
        done = [b for b in self.imports.values() if b.status == "completed"]
        day = "1970-01-01"

        def row(batches: list[ImportBatch]) -> list[dict[str, str]]:
            if not batches:
                return []
            contacts = sum(len(b.contacts) for b in batches)
            return [{"forDate": day, "batches": str(len(batches)), "contacts": str(contacts)}]

        return Response(200, {"outstanding": row(outstanding), "recentlyCompleted": row(done)})

    def process_imports(self, now: float) -> None:
        """Apply every queued import whose delay has passed."""
        for batch in self.imports.values():
            if (
                batch.status == "completed"
                or batch.stuck
                or now < batch.queued_at + self.import_delay
            ):
                continue
            for contact in batch.contacts:
                email = normalise_email(contact["email"])
                if email in self.exclusions:
                    batch.failure.append(contact["email"])
                    continue
                contact_id, _ = self._upsert_contact(
                    {
                        "email": contact["email"],
                        "firstName": contact.get("first_name"),
                        "lastName": contact.get("last_name"),
                        "phone": contact.get("phone"),
                        "fieldValues": [
                            {"field": f.get("id"), "value": f.get("value")}
                            for f in contact.get("fields", [])
                            if isinstance(f, dict)
                        ],
                    }
                )
                for item in contact.get("subscribe", []):
                    list_id = str(item.get("listid"))
                    if list_id not in self.lists:
                        continue
                    current = self.memberships.get((contact_id, list_id))
                    if current is not None and current["status"] == 2:
                        continue  # documented: an import never re-subscribes
                    self._set_membership(contact_id, list_id, 1, "import", now)
                for item in contact.get("unsubscribe", []):
                    list_id = str(item.get("listid"))
                    if list_id in self.lists:
                        self._set_membership(contact_id, list_id, 2, "import", now)
                batch.success.append(contact_id)
            batch.status = "completed"

    # ---- inspection (tests and humans; not part of AC's API) ---------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        self.process_imports(now)
        lists: dict[str, Any] = {}
        for list_id, lst in self.lists.items():
            members = {
                normalise_email(self.contacts[cid]["email"]): m["status"]
                for (cid, lid), m in self.memberships.items()
                if lid == list_id
            }
            lists[lst["name"]] = {"id": list_id, "stringid": lst["stringid"], "members": members}
        return {
            "lists": lists,
            "contacts": len(self.contacts),
            "imports": {
                b.batch_id: {
                    "status": b.status,
                    "contacts": len(b.contacts),
                    "queued_at": b.queued_at,
                }
                for b in self.imports.values()
            },
        }

    def self_unsubscribe(self, email: str, list_name: str) -> bool:
        """A person unsubscribes themselves (from an email footer): status 2 set by them."""
        contact_id = self.email_index.get(normalise_email(email))
        list_id = next((i for i, lst in self.lists.items() if lst["name"] == list_name), None)
        if contact_id is None or list_id is None:
            return False
        self._set_membership(contact_id, list_id, 2, "self", self.clock())
        return True

    def set_faults(self, values: Mapping[str, Any], now: float) -> Faults:
        faults = Faults()
        for key, value in values.items():
            if key == "storm_429_seconds":
                faults.storm_429_until = now + float(value)
            elif key == "latency_ms":
                low, high = value
                faults.latency_min, faults.latency_max = low / 1000.0, high / 1000.0
            elif hasattr(faults, key):
                setattr(faults, key, type(getattr(faults, key))(value))
            else:
                raise ValueError(f"unknown fault {key!r}")
        self.faults = faults
        return faults
