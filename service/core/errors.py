"""The service's exception tree. Every error carries the data needed to act on it.

::

    ServiceError
    ├── ConfigError(field, why)                 bad or missing configuration; exit status 2
    ├── PoisonMessage(reason, detail)           a record that can never be applied; goes to the DLQ
    ├── SchemaUnavailable(schema_id, detail)    a record's writer schema cannot be fetched now
    │                                           (registry down): read it again later, never park it
    └── ApiError                                an ActiveCampaign call did not succeed
        ├── RateLimited(retry_after)            429 (or bulk-import "Rate limit exceeded."): back off
        ├── TransientApiError(status, detail)   5xx, timeout, connection error, non-JSON 2xx: retry
        ├── AccountBlocked                      nothing can succeed until an operator acts: stop all
        │   ├── AuthRejected(status, detail)    401/402/403 or an HTML login page
        │   └── Redirected(status, detail)      3xx: AC_API_URL is wrong (http -> https, old host)
        └── PermanentApiError(status, code, detail, pointer)  4xx about this record: to the DLQ

No error message ever contains the API token or a raw email address.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error this service raises on purpose."""


class ConfigError(ServiceError):
    """A configuration value is missing or malformed."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class PoisonMessage(ServiceError):
    """A record that cannot be decoded or validated. ``reason`` is a short enumerated label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SchemaUnavailable(ServiceError):
    """The writer schema of a record cannot be fetched right now (the registry is unreachable or
    answers 5xx). The record itself may be fine: it is read again later, never dead-lettered.
    ``retry_after`` is when asking again makes sense (seconds)."""

    def __init__(self, schema_id: int, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(f"schema {schema_id}: {detail}")
        self.schema_id = schema_id
        self.detail = detail
        self.retry_after = retry_after


class ApiError(ServiceError):
    """An ActiveCampaign request that did not succeed."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(f"status={status} {detail}")
        self.status = status
        self.detail = detail


class RateLimited(ApiError):
    """AC asked us to slow down; no request may be sent for ``retry_after`` seconds."""

    def __init__(self, retry_after: float, status: int | None = 429, detail: str = "") -> None:
        super().__init__(status, detail or f"rate limited, retry after {retry_after:g}s")
        self.retry_after = retry_after


class TransientApiError(ApiError):
    """A failure that repeating the same request later may fix."""


class AccountBlocked(ApiError):
    """No request can succeed until an operator acts: not a per-record failure. All sending
    stops; one probe at a time checks whether it is fixed."""


class AuthRejected(AccountBlocked):
    """The token was refused (or the account is blocked for billing)."""


class Redirected(AccountBlocked):
    """AC answered with a redirect: the configured URL is wrong (never followed: the token
    would go wherever the redirect points)."""


class PermanentApiError(ApiError):
    """AC refused this record for a reason that retrying cannot fix (``code`` as AC gave it)."""

    def __init__(
        self, status: int | None, code: str, detail: str, body: object = None, pointer: str = ""
    ) -> None:
        super().__init__(status, f"{code}: {detail}")
        self.code = code
        self.body = body  # AC's parsed answer (bulk import's failureReasons live here)
        self.pointer = pointer  # which field AC objected to, e.g. /data/attributes/list
