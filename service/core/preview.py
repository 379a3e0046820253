"""The dry run (``run --dry-run``): ActiveCampaign with every write answered here. Pure.

A preview runs the real pipeline unchanged. Its AC calls (``service/core/acapi.py``) are
wrapped by ``previewed``: each request goes through ``Shadow.plan``, which either answers it
locally (``Local``) or names the read to send to AC (``Ask``); AC's answer to a read then goes
through ``Shadow.merge``. Nothing that changes AC ever leaves:

==================================  ================================================================
request                             in a dry run
==================================  ================================================================
``POST lists``                      answered 201 with a list of a preview id (``is_preview_id``)
``POST contact/sync``               becomes ``GET contacts?email=`` (one read): the contact's real
                                    id when AC has it, a preview id otherwise; answered 200/201
``POST contactLists``               answered 200; the status is kept in the shadow's memberships
``POST import/bulk_import``         answered 200 with a preview batch id; each contact's subscribe
                                    and unsubscribe kept (a 2 the shadow holds is not overridden)
``GET import/info`` (preview batch)  answered ``completed`` with the batch's contact ids
``GET`` naming a preview id         answered from the shadow (a preview list, contact or page past
                                    one)
any other ``GET``                   sent to AC; the answer is corrected by the shadow's memberships
                                    (a contact the run subscribed shows as subscribed) and lists
==================================  ================================================================

So the pipeline sees AC as it would be after the writes it decided, and its later decisions in
the same run stay consistent with them. Each answered write is kept (``wrote``) for the report
(``preview_report.py``), which pairs it with the pipeline's decision per change (``classify``).

Limits, by construction: AC's own refusals of writes (an excluded email, a duplicate list
``stringid``) cannot be known without writing, so they never show; a contact the run imported
without knowing its id gets a preview id, and later reads of it in the same run are answered
from the shadow alone (not from AC's state of that person).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from service.core.acapi import ApiCall, Call, Reply
from service.core.model import normalise_email

T = TypeVar("T")

# Ids the shadow makes up: numeric like AC's (the ledger keeps numeric contact ids compactly),
# above any id AC hands out, so keyset paging (``id_greater``) finds them after the real ones.
PREVIEW_ID_BASE = 9_000_000_000_000_000_000
PREVIEW_BATCH = "preview-"


def is_preview_id(value: str) -> bool:
    return value.isdigit() and int(value) >= PREVIEW_ID_BASE


@dataclass(frozen=True)
class Local:
    reply: Reply


@dataclass(frozen=True)
class Ask:
    call: ApiCall


class ShadowLike(Protocol):
    def plan(self, call: ApiCall) -> Local | Ask: ...

    def merge(self, call: ApiCall, reply: Reply) -> Reply: ...


def previewed(call: Call[T], shadow: ShadowLike) -> Call[T]:
    """``call`` with its writes answered by ``shadow``: yields only reads for AC."""
    try:
        request = next(call)
        while True:
            step = shadow.plan(request)
            if isinstance(step, Local):
                reply = step.reply
            else:
                answer = yield step.call
                reply = shadow.merge(request, answer)
            request = call.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _json(status: int, body: Any) -> Reply:
    return Reply(status, "application/json", json.dumps(body).encode())


def _params(call: ApiCall) -> tuple[dict[str, str], list[str]]:
    """(last value of each parameter, every ``ids[]``)."""
    single = {k: v for k, v in call.params if k != "ids[]"}
    return single, [v for k, v in call.params if k == "ids[]"]


@dataclass(frozen=True)
class Wrote:
    status: int
    by_import: bool


@dataclass
class Shadow:
    """What a dry run wrote, as AC would hold it; see the module docstring. Not thread-safe:
    ``service/adapters/preview.py`` serialises access."""

    members: dict[tuple[str, str], int] = field(default_factory=dict)  # (contact, list) -> status
    emails: dict[str, str] = field(default_factory=dict)  # contact id -> email (known ones)
    ids: dict[str, str] = field(default_factory=dict)  # email -> contact id
    lists: dict[str, dict[str, str]] = field(default_factory=dict)  # preview list id -> record
    names: dict[str, str] = field(default_factory=dict)  # list id -> name (seen or made)
    batches: dict[str, list[str]] = field(default_factory=dict)  # preview batch -> contact ids
    # (email, or "#" + contact id when the email is unknown, list id) -> the last write
    written: dict[tuple[str, str], Wrote] = field(default_factory=dict)
    writes: Counter[str] = field(default_factory=Counter)  # would have been sent, by request
    reads: Counter[str] = field(default_factory=Counter)  # sent to AC, by request
    imported_contacts: int = 0
    created: list[str] = field(default_factory=list)  # names of the lists it would create
    _next: int = 0

    # ---- the two steps -------------------------------------------------------------------

    def plan(self, call: ApiCall) -> Local | Ask:
        if call.method != "GET":
            self.writes[f"{call.method} {call.endpoint}"] += 1
            return self._write(call)
        local = self._read_locally(call)
        if local is not None:
            return Local(local)
        asked = self._forwarded(call)
        self.reads[f"GET {asked.endpoint}"] += 1
        return Ask(asked)

    def merge(self, call: ApiCall, reply: Reply) -> Reply:
        """AC's answer to the read ``plan`` asked for ``call``, as the pipeline must see it."""
        if reply.failure is not None or reply.status is None or not 200 <= reply.status < 300:
            return reply  # an error means what it means (a retry, the gate)
        try:
            body = json.loads(reply.body)
        except ValueError:
            return reply
        if not isinstance(body, dict):
            return reply
        if call.method == "POST" and call.endpoint == "/contact/sync":
            return self._synced(call, body)
        if call.endpoint == "/contacts":
            body = self._contacts_seen(call, body)
        elif call.endpoint == "/contacts/{id}/contactLists":
            body = self._memberships_seen(call.path.split("/")[1], body)
        elif call.endpoint == "/lists":
            body = self._lists_seen(call, body)
        elif call.endpoint == "/lists/{id}":
            self._learn_list(body.get("list"))
        return Reply(reply.status, "application/json", json.dumps(body).encode())

    def wrote(self, email: str, contact_id: str | None, list_id: str | None) -> Wrote | None:
        """The write this run answered for the email (or contact) on the list, forgotten once
        asked (the report pairs each write with one change). Learns whose the contact id is."""
        if contact_id is not None:
            self.learn(email, contact_id)
        if list_id is None:
            return None
        found = self.written.pop((email, list_id), None)
        if contact_id is not None:
            by_id = self.written.pop(("#" + contact_id, list_id), None)
            found = found or by_id
        return found

    def learn(self, email: str, contact_id: str) -> None:
        """Whose a contact id is (the pipeline knew it from the ledger: a later read of the
        run's own membership for that id can then name the email)."""
        if contact_id not in self.emails:
            self._contact(email, contact_id)

    # ---- writes ----------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next += 1
        return str(PREVIEW_ID_BASE + self._next)

    def _contact(self, email: str, contact_id: str | None = None) -> str:
        contact_id = contact_id or self.ids.get(email) or self._new_id()
        self.ids[email] = contact_id
        self.emails[contact_id] = email
        return contact_id

    def _write(self, call: ApiCall) -> Local | Ask:
        body: Mapping[str, Any] = call.body or {}
        if call.endpoint == "/lists":
            return Local(self._create_list(body.get("list") or {}))
        if call.endpoint == "/contact/sync":
            data = body.get("contact") or {}
            email = normalise_email(str(data.get("email", "")))
            if email in self.ids:
                return Local(self._sync_answer(email, self.ids[email], data, created=False))
            asked = ApiCall("GET", "/contacts", "contacts", (("email", email), ("limit", "1")))
            self.reads["GET /contacts"] += 1
            return Ask(asked)
        if call.endpoint == "/contactLists":
            return Local(self._set_status(body.get("contactList") or {}))
        if call.endpoint == "/import/bulk_import":
            return Local(self._import(body.get("contacts") or []))
        # A write this module does not know must never reach AC: refused, visibly.
        return Local(
            _json(422, {"errors": [{"code": "dry_run", "title": "not answered in a dry run"}]})
        )

    def _create_list(self, data: Mapping[str, Any]) -> Reply:
        list_id = self._new_id()
        record = {
            "id": list_id,
            "name": str(data.get("name", "")),
            "stringid": str(data.get("stringid", "")),
            "sender_url": str(data.get("sender_url", "")),
            "sender_reminder": str(data.get("sender_reminder", "")),
        }
        self.lists[list_id] = record
        self.names[list_id] = record["name"]
        self.created.append(record["name"])
        return _json(201, {"list": record})

    def _sync_answer(
        self, email: str, contact_id: str, data: Mapping[str, Any], *, created: bool
    ) -> Reply:
        view = {"id": contact_id, "email": email}
        for name in ("firstName", "lastName", "phone"):
            if isinstance(data.get(name), str):
                view[name] = data[name]
        return _json(201 if created else 200, {"contact": view, "fieldValues": []})

    def _synced(self, call: ApiCall, found: Mapping[str, Any]) -> Reply:
        data = (call.body or {}).get("contact") or {}
        email = normalise_email(str(data.get("email", "")))
        known = None
        for item in found.get("contacts") or []:
            if isinstance(item, dict) and normalise_email(str(item.get("email", ""))) == email:
                known = str(item.get("id"))
        contact_id = self._contact(email, known)
        return self._sync_answer(email, contact_id, data, created=known is None)

    def _set_status(self, row: Mapping[str, Any]) -> Reply:
        list_id, contact_id = str(row.get("list", "")), str(row.get("contact", ""))
        status = int(str(row.get("status", "0")) or 0)
        self.members[(contact_id, list_id)] = status
        who = self.emails.get(contact_id) or "#" + contact_id
        self.written[(who, list_id)] = Wrote(status, False)
        view = {"id": contact_id, "email": self.emails.get(contact_id, "")}
        answer = {"contact": contact_id, "list": list_id, "status": status}
        return _json(200, {"contacts": [view], "contactList": {**answer, "id": "preview"}})

    def _import(self, contacts: list[Any]) -> Reply:
        batch = f"{PREVIEW_BATCH}{len(self.batches) + 1}"
        ids: list[str] = []
        for item in contacts:
            if not isinstance(item, dict):
                continue
            email = normalise_email(str(item.get("email", "")))
            contact_id = self._contact(email)
            ids.append(contact_id)
            for key, status in (("subscribe", 1), ("unsubscribe", 2)):
                for target in item.get(key) or []:
                    list_id = str(target.get("listid")) if isinstance(target, dict) else ""
                    if status == 1 and self.members.get((contact_id, list_id)) == 2:
                        pass  # AC: an import never re-subscribes an unsubscribed contact
                    else:
                        self.members[(contact_id, list_id)] = status
                    self.written[(email, list_id)] = Wrote(status, True)
        self.batches[batch] = ids
        self.imported_contacts += len(ids)
        queued = {"success": 1, "queued_contacts": len(ids), "message": "Contact import queued"}
        return _json(200, {**queued, "batchId": batch})

    # ---- reads -----------------------------------------------------------------------------

    def _read_locally(self, call: ApiCall) -> Reply | None:
        """The answer to a read that names something only this run made, else None."""
        path = call.path.split("/")
        params, ids = _params(call)
        if call.endpoint == "/lists/{id}" and is_preview_id(path[1]):
            return _json(200, {"list": self.lists.get(path[1], {"id": path[1]})})
        if call.endpoint == "/contacts/{id}/contactLists" and is_preview_id(path[1]):
            return _json(200, {"contactLists": self._rows(path[1])})
        if call.endpoint == "/import/info" and params.get("batchId", "") in self.batches:
            done = self.batches[params["batchId"]]
            return _json(200, {"status": "completed", "success": done, "failure": []})
        if call.endpoint == "/contacts" and (
            is_preview_id(params.get("listid", "0"))
            or is_preview_id(params.get("id_greater", "0"))
            or (ids and all(is_preview_id(i) for i in ids))
            or is_preview_id(self.ids.get(normalise_email(params.get("email", "")), "0"))
        ):
            return _json(200, self._page(params, ids, set()))
        return None

    def _forwarded(self, call: ApiCall) -> ApiCall:
        """The read to send: without the preview ids AC does not know."""
        if not any(k == "ids[]" and is_preview_id(v) for k, v in call.params):
            return call
        params = tuple((k, v) for k, v in call.params if not (k == "ids[]" and is_preview_id(v)))
        return ApiCall(call.method, call.endpoint, call.path, params, call.body, call.priority)

    def _rows(self, contact_id: str) -> list[dict[str, str]]:
        return [
            {"contact": c, "list": lid, "status": str(status), "id": f"{c}-{lid}"}
            for (c, lid), status in self.members.items()
            if c == contact_id
        ]

    def _matches(self, contact_id: str, params: Mapping[str, str], ids: list[str]) -> bool:
        email = self.emails.get(contact_id)
        if email is None or (ids and contact_id not in ids):
            return False
        if "email" in params and normalise_email(params["email"]) != email:
            return False
        if "listid" in params:
            status = self.members.get((contact_id, params["listid"]))
            if status is None or ("status" in params and str(status) != params["status"]):
                return False
        return not ("id_greater" in params and int(contact_id) <= int(params["id_greater"]))

    def _page(self, params: Mapping[str, str], ids: list[str], seen: set[str]) -> dict[str, Any]:
        """The contacts this run knows that match the read (``seen``: already in AC's page)."""
        found = sorted(
            (c for c in self.emails if c not in seen and self._matches(c, params, ids)), key=int
        )
        limit = int(params.get("limit", "20") or 20)
        page = found[:limit]
        return {
            "contacts": [{"id": c, "email": self.emails[c]} for c in page],
            "meta": {"total": str(len(found))},
        }

    def _contacts_seen(self, call: ApiCall, body: dict[str, Any]) -> dict[str, Any]:
        params, ids = _params(call)
        listed = [c for c in body.get("contacts") or [] if isinstance(c, dict)]
        for item in listed:
            if item.get("id") is not None and item.get("email"):
                self._contact(normalise_email(str(item["email"])), str(item["id"]))
        kept = listed
        if "listid" in params and "status" in params:
            # A membership this run set wins over what AC holds.
            kept = [
                c
                for c in listed
                if self.members.get((str(c.get("id")), params["listid"]), int(params["status"]))
                == int(params["status"])
            ]
        extra: list[dict[str, Any]] = []
        limit = int(params.get("limit", "20") or 20)
        if len(listed) < limit:  # AC's last page: what this run added comes after it
            seen = {str(c.get("id")) for c in listed}
            extra = self._page(params, ids, seen)["contacts"][: limit - len(kept)]
        meta = body.get("meta")
        if isinstance(meta, dict) and str(meta.get("total", "")).lstrip("-").isdigit():
            total = int(meta["total"]) - (len(listed) - len(kept)) + len(extra)
            body = {**body, "meta": {**meta, "total": str(total)}}
        return {**body, "contacts": kept + extra}

    def _memberships_seen(self, contact_id: str, body: dict[str, Any]) -> dict[str, Any]:
        rows = [r for r in body.get("contactLists") or [] if isinstance(r, dict)]
        ours = {lid: status for (c, lid), status in self.members.items() if c == contact_id}
        result = []
        for row in rows:
            list_id = str(row.get("list"))
            if list_id in ours:
                result.append({**row, "status": str(ours.pop(list_id)), "udate": None})
            else:
                result.append(row)
        result += [r for r in self._rows(contact_id) if r["list"] in ours]
        return {**body, "contactLists": result}

    def _learn_list(self, item: Any) -> None:
        if isinstance(item, dict) and item.get("id") is not None:
            self.names[str(item["id"])] = str(item.get("name", ""))

    def _lists_seen(self, call: ApiCall, body: dict[str, Any]) -> dict[str, Any]:
        params, _ = _params(call)
        listed = [item for item in body.get("lists") or [] if isinstance(item, dict)]
        for item in listed:
            self._learn_list(item)
        if len(listed) >= int(params.get("limit", "20") or 20):
            return body
        wanted = params.get("filters[name]", "").lower()
        made = [dict(r) for r in self.lists.values() if wanted in r["name"].lower()]
        return {**body, "lists": listed + made}
