"""What an ActiveCampaign answer means: ``classify_response`` and Retry-After. Pure, no I/O.
``acapi.answer`` applies it to every reply of a sans-IO call (``acapi.py``).

``classify_response`` is pure: status, content type, body and Retry-After in, either the parsed
JSON or an ``ApiError`` out. Rules, in order (AC has no single error envelope, so status first):

=====================================  ==============================================
answer                                 meaning
=====================================  ==============================================
2xx with a JSON object                 success
2xx HTML login page                    ``AuthRejected`` (field-observed bad-token answer)
2xx anything else not JSON             ``TransientApiError`` (never success)
3xx                                    ``Redirected``: AC_API_URL is wrong; stop all traffic
429                                    ``RateLimited(Retry-After)``
400 "Rate limit exceeded." (import)    ``RateLimited(60)``: back-pressure, not a bad record
401, 402, 403                          ``AuthRejected``: stop all traffic
408, 409, 425, 5xx                     ``TransientApiError`` (503 with Retry-After: ``RateLimited``)
other 4xx                              ``PermanentApiError(code)`` with AC's own code
=====================================  ==============================================

Retry-After is bounded (``MAX_RETRY_AFTER``): AC documents whole seconds (examples up to 30);
a value that is not a finite number, or an absurd one, must not stop all traffic for ever.
Nothing here ever holds the token or puts a raw email into an error message.
"""

from __future__ import annotations

import json
import math
from email.utils import parsedate_to_datetime
from typing import Any

from service.core.errors import (
    ApiError,
    AuthRejected,
    PermanentApiError,
    RateLimited,
    Redirected,
    TransientApiError,
)

IMPORT_RATE_LIMIT_PAUSE = 60.0
DEFAULT_RETRY_AFTER = 5.0
MAX_RETRY_AFTER = 300.0  # a longer pause is treated as this (and shows in readiness/metrics)


def parse_retry_after(value: str | None, default: float, now_wall: float) -> float:
    """Retry-After in seconds, within [0, ``MAX_RETRY_AFTER``]; an HTTP date is also accepted
    (relative to ``now_wall``). Anything unreadable or not finite gives ``default``."""
    if not value:
        return min(default, MAX_RETRY_AFTER)
    seconds: float | None = None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now_wall
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = None
    if seconds is None or not math.isfinite(seconds):
        seconds = default
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def pause_after(status: int, retry_after: str | None, now_wall: float) -> float:
    """Seconds every request must wait after this answer (0: none): a 429, or a 503 with a
    Retry-After (one integrator saw AC throttle so)."""
    if status == 429 or (status == 503 and retry_after):
        return parse_retry_after(retry_after, DEFAULT_RETRY_AFTER, now_wall)
    return 0.0


def _error_code(body: Any) -> tuple[str, str]:
    """AC's error code and title from any of its error shapes."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            return str(first.get("code") or "error"), str(first.get("title") or "")[:200]
        if "message" in body:
            return "error", str(body["message"])[:200]
    return "error", ""


def _pointer(body: Any) -> str:
    """The JSON pointer of AC's first validation error (which field it is about)."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            source = errors[0].get("source")
            if isinstance(source, dict):
                return str(source.get("pointer") or "")
    return ""


def classify_response(
    status: int, content_type: str, body: bytes, retry_after: str | None, now_wall: float = 0.0
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
    if 300 <= status < 400:
        return Redirected(status, "AC answered with a redirect: check AC_API_URL (https, host)")
    if status == 429:
        return RateLimited(parse_retry_after(retry_after, DEFAULT_RETRY_AFTER, now_wall), 429)
    if (
        status == 400
        and isinstance(parsed, dict)
        and parsed.get("message") == "Rate limit exceeded."
    ):
        return RateLimited(IMPORT_RATE_LIMIT_PAUSE, 400, "bulk import rate limit exceeded")
    if status in (401, 402, 403):
        return AuthRejected(status, "ActiveCampaign refused the token or the account")
    if status == 503 and retry_after:
        return RateLimited(parse_retry_after(retry_after, DEFAULT_RETRY_AFTER, now_wall), 503)
    if status in (408, 409, 425) or status >= 500:
        return TransientApiError(status, f"server answered {status}")
    code, title = _error_code(parsed)
    return PermanentApiError(status, code, title, parsed, pointer=_pointer(parsed))
