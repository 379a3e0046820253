import json

import pytest

from service.core.ac_responses import (
    MAX_RETRY_AFTER,
    classify_response,
    parse_retry_after,
    pause_after,
)
from service.core.acapi import ApiCall, Reply, answer
from service.core.errors import (
    AccountBlocked,
    ApiError,
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


# ---- every rule, at its edges, with what the error carries ---------------------------------


def kind_and_detail(result: object) -> tuple[str, int | None, str]:
    assert isinstance(result, ApiError), result
    return type(result).__name__, result.status, result.detail


def test_the_2xx_range_is_success_and_only_it() -> None:
    assert classify_response(200, JSON, body({"a": 1}), None) == {"a": 1}
    assert classify_response(299, JSON, body({"a": 1}), None) == {"a": 1}
    assert isinstance(classify_response(300, JSON, body({"a": 1}), None), Redirected)
    assert kind_and_detail(classify_response(399, JSON, body({"a": 1}), None)) == (
        "Redirected",
        399,
        "AC answered with a redirect: check AC_API_URL (https, host)",
    )
    result = classify_response(400, JSON, body({"message": "bad"}), None)
    assert kind_and_detail(result) == ("PermanentApiError", 400, "error: bad")


def test_a_2xx_without_a_json_object_is_transient_and_says_so() -> None:
    for payload in (b"null", b"", b"[]", b'"text"', b"{"):
        assert kind_and_detail(classify_response(204, JSON, payload, None)) == (
            "TransientApiError",
            204,
            "a 204 answer that is not a JSON object",
        )


def test_a_login_page_is_recognised_whatever_the_case_and_by_either_word() -> None:
    expected = ("AuthRejected", 200, "a 2xx HTML login page instead of JSON: token refused")
    for page in (b"<h1>LOGIN</h1>", b"<input type=Password>"):
        assert kind_and_detail(classify_response(200, "Text/HTML; charset=utf-8", page, None)) == (
            expected
        )
    # a page that is not HTML, or HTML that asks for nothing, is not a refused token
    assert isinstance(classify_response(200, "text/plain", b"login", None), TransientApiError)
    assert isinstance(classify_response(200, "text/html", b"<p>down</p>", None), TransientApiError)


def test_an_undecodable_login_page_is_still_read() -> None:
    page = b"\xff\xfe<html>login</html>"
    assert isinstance(classify_response(200, "text/html", page, None), AuthRejected)


def test_only_the_first_4096_bytes_of_a_page_are_read() -> None:
    page = b"<html>" + b" " * (4096 - 6 - 4) + b"login"  # "logi" within the first 4096 bytes
    assert len(page) == 4097
    assert isinstance(classify_response(200, "text/html", page, None), TransientApiError)
    assert isinstance(classify_response(200, "text/html", page[1:], None), AuthRejected)


def test_429_and_503_carry_their_status_and_retry_after() -> None:
    result = classify_response(429, JSON, b"", None)
    assert isinstance(result, RateLimited)
    assert (result.status, result.retry_after) == (429, 5.0)  # none given: the default
    result = classify_response(503, JSON, b"", "2", now_wall=0.0)
    assert isinstance(result, RateLimited)
    assert (result.status, result.retry_after) == (503, 2.0)
    assert kind_and_detail(classify_response(503, JSON, b"", None)) == (
        "TransientApiError",
        503,
        "server answered 503",
    )
    assert kind_and_detail(classify_response(502, JSON, b"", "2")) == (
        "TransientApiError",
        502,
        "server answered 502",
    )


def test_a_retry_after_date_counts_from_the_wall_clock_given() -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    at = 1445412480.0  # that moment
    result = classify_response(429, JSON, b"", date, now_wall=at - 12)
    assert isinstance(result, RateLimited) and result.retry_after == 12.0
    result = classify_response(503, JSON, b"", date, now_wall=at - 7)
    assert isinstance(result, RateLimited) and result.retry_after == 7.0


def test_acs_import_limit_is_a_minute_of_back_pressure() -> None:
    answer = body({"message": "Rate limit exceeded."})
    result = classify_response(400, JSON, answer, None)
    assert isinstance(result, RateLimited)
    assert (result.retry_after, result.status, result.detail) == (
        60.0,
        400,
        "bulk import rate limit exceeded",
    )
    # the same words with another status, or other words: a refusal of this request
    assert isinstance(classify_response(422, JSON, answer, None), PermanentApiError)
    other = body({"message": "Rate limit exceeded"})
    assert isinstance(classify_response(400, JSON, other, None), PermanentApiError)
    assert isinstance(classify_response(400, JSON, b"[1]", None), PermanentApiError)


@pytest.mark.parametrize("status", [401, 402, 403])
def test_a_refused_token_says_so(status: int) -> None:
    assert kind_and_detail(classify_response(status, JSON, b"", None)) == (
        "AuthRejected",
        status,
        "ActiveCampaign refused the token or the account",
    )


@pytest.mark.parametrize(("status", "transient"), [(404, False), (407, False), (408, True),
    (409, True), (410, False), (424, False), (425, True), (426, False), (499, False),
    (500, True), (599, True)])  # fmt: skip
def test_which_4xx_and_5xx_are_worth_repeating(status: int, transient: bool) -> None:
    result = classify_response(status, JSON, b"", None)
    assert isinstance(result, TransientApiError if transient else PermanentApiError)
    if transient:
        assert result.detail == f"server answered {status}"


def test_a_permanent_error_carries_acs_code_title_body_and_pointer() -> None:
    answer = {
        "errors": [
            {"title": "T" * 300, "code": "duplicate", "source": {"pointer": "/data/x"}},
            {"title": "second", "code": "other"},
        ]
    }
    result = classify_response(422, JSON, body(answer), None)
    assert isinstance(result, PermanentApiError)
    assert result.code == "duplicate"
    assert result.detail == "duplicate: " + "T" * 200
    assert result.body == answer
    assert result.pointer == "/data/x"


@pytest.mark.parametrize(
    ("answer", "code", "detail", "pointer"),
    [
        ({"errors": [{"title": "t"}]}, "error", "t", ""),
        ({"errors": [{"code": "c"}]}, "c", "", ""),
        ({"errors": [{"code": "", "title": None}]}, "error", "", ""),
        ({"errors": [{"code": "c", "source": {"pointer": None}}]}, "c", "", ""),
        ({"errors": [{"code": "c", "source": "/x"}]}, "c", "", ""),
        ({"errors": ["not an object"], "message": "m"}, "error", "m", ""),
        ({"errors": [], "message": "m" * 300}, "error", "m" * 200, ""),
        ({"errors": "x"}, "error", "", ""),
        ({"message": 12}, "error", "12", ""),
        ({"other": 1}, "error", "", ""),
        ([1, 2], "error", "", ""),
        (None, "error", "", ""),
    ],
)
def test_acs_error_shapes_all_give_a_code(
    answer: object, code: str, detail: str, pointer: str
) -> None:
    payload = b"" if answer is None else body(answer)
    result = classify_response(422, JSON, payload, None)
    assert isinstance(result, PermanentApiError)
    assert (result.code, result.detail, result.pointer) == (code, f"{code}: {detail}", pointer)


def test_answer_returns_the_object_or_raises_its_error() -> None:
    call = ApiCall("GET", "lists", "lists")
    assert answer(call, Reply(200, JSON, body({"lists": []}))) == {"lists": []}
    with pytest.raises(PermanentApiError):
        answer(call, Reply(404, JSON, body({"message": "No Result found"})))
    with pytest.raises(TransientApiError) as raised:
        answer(call, Reply(failure="timeout"))
    assert (raised.value.status, raised.value.detail) == (None, "timeout")
    with pytest.raises(RateLimited) as limited:
        answer(call, Reply(429, JSON, b"", "Wed, 21 Oct 2015 07:28:00 GMT"), 1445412470.0)
    assert limited.value.retry_after == 10.0


def test_pause_after_stops_everyone_on_429_and_on_503_with_retry_after_only() -> None:
    assert pause_after(429, None, 0.0) == 5.0
    assert pause_after(429, "3", 0.0) == 3.0
    assert pause_after(503, "4", 0.0) == 4.0
    assert pause_after(503, None, 0.0) == 0.0
    assert pause_after(503, "", 0.0) == 0.0
    assert pause_after(500, "4", 0.0) == 0.0
    assert pause_after(200, "4", 0.0) == 0.0
    assert pause_after(429, "Wed, 21 Oct 2015 07:28:00 GMT", 1445412478.0) == 2.0


def test_parse_retry_after_bounds_and_defaults() -> None:
    assert parse_retry_after("", 7.0, 0.0) == 7.0
    assert parse_retry_after(None, 1000.0, 0.0) == MAX_RETRY_AFTER
    assert parse_retry_after("-3", 7.0, 0.0) == 0.0
    assert parse_retry_after("300", 7.0, 0.0) == 300.0
    assert parse_retry_after("301", 7.0, 0.0) == MAX_RETRY_AFTER
    assert parse_retry_after("0.5", 7.0, 0.0) == 0.5
    assert parse_retry_after("nan", 7.0, 0.0) == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 7.0, 1445412400.0) == 80.0
    assert parse_retry_after("Wed, 99 Foo", 7.0, 0.0) == 7.0
    assert parse_retry_after("Wed, 21 Oct 99999 07:28:00 GMT", 7.0, 0.0) == 7.0


def test_answer_reads_the_content_type() -> None:
    call = ApiCall("GET", "lists", "lists")
    with pytest.raises(AuthRejected):
        answer(call, Reply(200, "text/html", b"<html>login</html>"))


def test_a_refusal_that_is_not_json_has_no_body() -> None:
    result = classify_response(422, "text/html", b"<html>no</html>", None)
    assert isinstance(result, PermanentApiError) and result.body is None


def test_an_unreadable_retry_after_on_a_503_waits_the_default() -> None:
    result = classify_response(503, JSON, b"", "soon")
    assert isinstance(result, RateLimited) and result.retry_after == 5.0
