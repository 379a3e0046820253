import json

import pytest

from service.core.acapi import classify_response
from service.core.errors import (
    AccountBlocked,
    AuthRejected,
    PermanentApiError,
    RateLimited,
    Redirected,
    TransientApiError,
)

JSON = "application/json"


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_success_json() -> None:
    assert classify_response(201, JSON, body({"contact": {"id": "1"}}), None) == {
        "contact": {"id": "1"}
    }


def test_html_login_page_on_2xx_is_auth_failure() -> None:
    page = b"<html><title>Login | ActiveCampaign</title><form><input name='password'></form></html>"
    assert isinstance(classify_response(200, "text/html", page, None), AuthRejected)


@pytest.mark.parametrize("payload", [b"", b"<html>maintenance</html>", b"[1,2]", b"not json"])
def test_other_non_json_2xx_is_never_success(payload: bytes) -> None:
    assert isinstance(classify_response(200, "text/html", payload, None), TransientApiError)


def test_429_honours_retry_after() -> None:
    result = classify_response(429, JSON, b"", "30")
    assert isinstance(result, RateLimited)
    assert result.retry_after == 30


def test_import_rate_limit_400_is_backpressure_not_bad_record() -> None:
    result = classify_response(
        400,
        JSON,
        body({"success": 0, "message": "Rate limit exceeded.", "failureReasons": ["Up to 100"]}),
        None,
    )
    assert isinstance(result, RateLimited)


@pytest.mark.parametrize("status", [401, 402, 403])
def test_auth(status: int) -> None:
    assert isinstance(classify_response(status, JSON, body({"message": "x"}), None), AuthRejected)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
def test_transient(status: int) -> None:
    assert isinstance(classify_response(status, "text/html", b"<html>", None), TransientApiError)


def test_503_with_retry_after_is_rate_limited() -> None:
    assert isinstance(classify_response(503, JSON, b"", "2"), RateLimited)


def test_422_is_permanent_with_acs_code() -> None:
    err = {
        "errors": [
            {
                "title": "Email address is not valid",
                "detail": "",
                "code": "email_invalid",
                "source": {"pointer": "/data/attributes/email"},
            }
        ]
    }
    result = classify_response(422, JSON, body(err), None)
    assert isinstance(result, PermanentApiError)
    assert result.code == "email_invalid"
    assert result.status == 422


def test_404_message_shape() -> None:
    result = classify_response(404, JSON, body({"message": "No Result found"}), None)
    assert isinstance(result, PermanentApiError)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_blocks_the_account_instead_of_parking_records(status: int) -> None:
    """An http -> https redirect once parked every change as ac_rejected: it says the URL is
    wrong, which no record can fix, and the token must never follow it."""
    result = classify_response(status, JSON, body({"message": "Moved"}), None)
    assert isinstance(result, Redirected) and isinstance(result, AccountBlocked)


def test_a_validation_error_names_its_field() -> None:
    answer = {
        "errors": [
            {
                "title": "x",
                "code": "related_missing",
                "source": {"pointer": "/data/attributes/list"},
            }
        ]
    }
    result = classify_response(422, JSON, body(answer), None)
    assert isinstance(result, PermanentApiError) and result.pointer == "/data/attributes/list"
