"""ActiveCampaign v3 calls and the classification of every answer.

``classify_response`` is pure: status, content type, body and Retry-After in, either the parsed
JSON or an ``ApiError`` out. Rules, in order (AC has no single error envelope, so status first):

=====================================  ==============================================
answer                                 meaning
=====================================  ==============================================
2xx with a JSON object                 success
2xx HTML login page                    ``AuthRejected`` (field-observed bad-token answer)
2xx anything else not JSON             ``TransientApiError`` (never success)
429                                    ``RateLimited(Retry-After)``
400 "Rate limit exceeded." (import)    ``RateLimited(60)``: back-pressure, not a bad record
401, 402, 403                          ``AuthRejected``: stop all traffic
408, 409, 425, 5xx                     ``TransientApiError`` (503 with Retry-After: ``RateLimited``)
other 4xx                              ``PermanentApiError(code)`` with AC's own code
=====================================  ==============================================

The client never logs or raises anything that contains the token or a raw email.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from service.adapters.ratelimit import URGENT, LimiterClosed, parse_retry_after
from service.core.errors import (
    ApiError,
    AuthRejected,
    PermanentApiError,
    RateLimited,
    TransientApiError,
)
from service.metrics import Metrics

PAGE_SIZE = 100  # AC's largest page for list endpoints

IMPORT_RATE_LIMIT_PAUSE = 60.0


def _error_code(body: Any) -> tuple[str, str]:
    """AC's error code and title from any of its error shapes."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return str(first.get("code") or "error"), str(first.get("title") or "")
        if "message" in body:
            return "error", str(body["message"])[:200]
    return "error", ""


def classify_response(
    status: int, content_type: str, body: bytes, retry_after: str | None
) -> dict[str, Any] | ApiError:
    """Pure classification of one AC answer (see the module docstring)."""
    parsed: Any = None
    is_json = False
    try:
        parsed = json.loads(body) if body else None
        is_json = parsed is not None
    except ValueError:
        is_json = False
    if 200 <= status < 300:
        if is_json and isinstance(parsed, dict):
            return parsed
        text = body[:4096].decode("utf-8", "replace").lower()
        if "html" in content_type.lower() and ("login" in text or "password" in text):
            return AuthRejected(status, "a 2xx HTML login page instead of JSON: token refused")
        return TransientApiError(status, f"a {status} answer that is not a JSON object")
    if status == 429:
        return RateLimited(parse_retry_after(retry_after, 5.0), 429)
    if (
        status == 400
        and isinstance(parsed, dict)
        and parsed.get("message") == "Rate limit exceeded."
    ):
        return RateLimited(IMPORT_RATE_LIMIT_PAUSE, 400, "bulk import rate limit exceeded")
    if status in (401, 402, 403):
        return AuthRejected(status, "ActiveCampaign refused the token or the account")
    if status == 503 and retry_after:
        return RateLimited(parse_retry_after(retry_after, 5.0), 503)
    if status in (408, 409, 425) or status >= 500:
        return TransientApiError(status, f"server answered {status}")
    code, title = _error_code(parsed)
    return PermanentApiError(status, code, title, parsed)


@dataclass(frozen=True)
class ImportStatus:
    completed: bool
    success_ids: list[str]
    failed_emails: list[str]


class ActiveCampaignClient:
    """Typed calls over one ``httpx.Client`` (whose transport carries the rate limiter)."""

    def __init__(
        self,
        http: httpx.Client,
        token: Callable[[], str],
        metrics: Metrics,
        *,
        sender_url: str = "https://www.example.com",
        sender_reminder: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._token = token
        self._metrics = metrics
        self._sender_url = sender_url
        self._sender_reminder = sender_reminder or "You joined one of our audiences."
        self._clock = clock

    def request(
        self,
        method: str,
        endpoint: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        urgent: bool = False,
    ) -> dict[str, Any]:
        """One attempt. Returns the JSON object or raises an ``ApiError`` subclass. ``urgent``
        requests take the rate limiter's next slot before normal ones."""
        started = self._clock()
        headers = {"Api-Token": self._token(), "Accept": "application/json"}
        try:
            response = self._http.request(
                method,
                path,
                json=body,
                params=params,
                headers=headers,
                extensions={URGENT: True} if urgent else None,
            )
        except httpx.TimeoutException:
            self._count(endpoint, method, "timeout", started)
            raise TransientApiError(None, "timeout") from None
        except LimiterClosed:
            raise TransientApiError(None, "shutting down") from None
        except httpx.TransportError as exc:
            self._count(endpoint, method, "conn_error", started)
            raise TransientApiError(None, f"connection error: {type(exc).__name__}") from None
        self._count(endpoint, method, str(response.status_code), started)
        result = classify_response(
            response.status_code,
            response.headers.get("Content-Type", ""),
            response.content,
            response.headers.get("Retry-After"),
        )
        if isinstance(result, ApiError):
            if isinstance(result, RateLimited):
                self._metrics.ac_rate_limited.inc()
            raise result
        return result

    def _count(self, endpoint: str, method: str, code: str, started: float) -> None:
        self._metrics.ac_requests.labels(endpoint, method, code).inc()
        self._metrics.ac_request_duration.labels(endpoint).observe(self._clock() - started)

    # ---- lists --------------------------------------------------------------------------

    def find_list(self, name: str) -> str | None:
        """The id of the list named exactly ``name`` (AC's filter is a contains match)."""
        offset = 0
        while True:
            page = self.request(
                "GET",
                "/lists",
                "lists",
                params={"filters[name]": name, "limit": "100", "offset": str(offset)},
            )
            lists = page.get("lists") or []
            for item in lists:
                if isinstance(item, dict) and item.get("name") == name:
                    return str(item["id"])
            if len(lists) < 100:
                return None
            offset += 100

    def create_list(self, name: str, stringid: str) -> str:
        body = {
            "list": {
                "name": name,
                "stringid": stringid,
                "sender_url": self._sender_url,
                "sender_reminder": self._sender_reminder,
            }
        }
        return str(self.request("POST", "/lists", "lists", body=body)["list"]["id"])

    def all_lists(self) -> dict[str, str]:
        """Every list: name -> id."""
        result: dict[str, str] = {}
        offset = 0
        while True:
            page = self.request(
                "GET", "/lists", "lists", params={"limit": "100", "offset": str(offset)}
            )
            lists = page.get("lists") or []
            result.update({str(i["name"]): str(i["id"]) for i in lists if isinstance(i, dict)})
            if len(lists) < 100:
                return result
            offset += 100

    # ---- contacts -----------------------------------------------------------------------

    def sync_contact(self, email: str, fields: Mapping[str, str], custom: Mapping[str, str]) -> str:
        contact: dict[str, Any] = {"email": email, **fields}
        if custom:
            contact["fieldValues"] = [{"field": k, "value": v} for k, v in custom.items()]
        answer = self.request("POST", "/contact/sync", "contact/sync", body={"contact": contact})
        return str(answer["contact"]["id"])

    def find_contact(self, email: str) -> str | None:
        answer = self.request("GET", "/contacts", "contacts", params={"email": email})
        contacts = answer.get("contacts") or []
        return str(contacts[0]["id"]) if contacts else None

    def contact_lists(self, contact_id: str) -> dict[str, int]:
        """List id -> status for one contact."""
        answer = self.request(
            "GET", "/contacts/{id}/contactLists", f"contacts/{contact_id}/contactLists"
        )
        return {
            str(row["list"]): int(row["status"])
            for row in answer.get("contactLists") or []
            if isinstance(row, dict)
        }

    def list_page(
        self, list_id: str, status: int, ids: Sequence[str] | None = None, offset: int = 0
    ) -> tuple[dict[str, str], int]:
        """One page (at most 100) of the contacts with ``status`` on a list: email (normalised)
        -> contact id, and AC's total of such contacts. ``ids`` narrows the query to those."""
        params: dict[str, Any] = {
            "listid": list_id,
            "status": str(status),
            "limit": str(PAGE_SIZE),
            "offset": str(offset),
        }
        if ids is not None:
            params["ids[]"] = list(ids)
        page = self.request("GET", "/contacts", "contacts", params=params)
        found: dict[str, str] = {}
        contacts = page.get("contacts") or []
        for item in contacts:
            if isinstance(item, dict) and item.get("email"):
                found[str(item["email"]).strip().lower()] = str(item["id"])
        meta = page.get("meta")
        try:
            total = int(meta["total"]) if isinstance(meta, dict) else -1
        except (KeyError, TypeError, ValueError):
            total = -1
        if total < 0:  # no usable total: a short page is the last one
            total = offset + len(contacts) + (1 if len(contacts) >= PAGE_SIZE else 0)
        return found, total

    def list_members(
        self, list_id: str, status: int, ids: Sequence[str] | None = None
    ) -> dict[str, str]:
        """Email (normalised) -> contact id of the contacts with ``status`` on a list, all pages;
        ``ids`` narrows the query to those contacts (at most 250 per call)."""
        result: dict[str, str] = {}
        offset = 0
        while True:
            found, total = self.list_page(list_id, status, ids, offset)
            result.update(found)
            offset += PAGE_SIZE
            if not found or offset >= total:
                return result

    def set_list_status(self, contact_id: str, list_id: str, status: int) -> None:
        body = {"contactList": {"list": list_id, "contact": contact_id, "status": str(status)}}
        self.request("POST", "/contactLists", "contactLists", body=body)

    # ---- bulk import --------------------------------------------------------------------

    def bulk_import(self, payload: Mapping[str, Any]) -> str:
        # Urgent: imports are the scarce resource (100 a minute); reads can wait a slot.
        answer = self.request(
            "POST", "/import/bulk_import", "import/bulk_import", body=payload, urgent=True
        )
        return str(answer["batchId"])

    def import_info(self, batch_id: str) -> ImportStatus:
        answer = self.request("GET", "/import/info", "import/info", params={"batchId": batch_id})
        if answer.get("status") != "completed":
            return ImportStatus(False, [], [])
        return ImportStatus(
            True,
            [str(i) for i in answer.get("success") or []],
            [str(e) for e in answer.get("failure") or []],
        )
