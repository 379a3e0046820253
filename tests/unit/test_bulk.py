import json
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from service.core.acapi import ApiCall, Reply, run_sync
from service.core.bulk import (
    MAX_BYTES,
    contact_entry,
    encoded_size,
    failed_indexes,
    next_poll_delay,
    pack,
    submit_import,
    verify_exits,
)
from service.core.errors import PermanentApiError, RateLimited, TransientApiError


def test_contact_entry_carries_lists_and_fields() -> None:
    entry = contact_entry(
        "a@b.com", {"1": 1, "2": 2, "3": 1}, {"firstName": "Ann", "phone": "1"}, {"12": "gold"}
    )
    assert entry == {
        "email": "a@b.com",
        "first_name": "Ann",
        "phone": "1",
        "fields": [{"id": 12, "value": "gold"}],
        "subscribe": [{"listid": "1"}, {"listid": "3"}],
        "unsubscribe": [{"listid": "2"}],
    }


def test_pack_respects_250_contacts() -> None:
    batches = pack([50] * 600)
    assert [len(b) for b in batches] == [250, 250, 100]
    assert [i for b in batches for i in b] == list(range(600))


@given(st.lists(st.integers(20, 60_000), min_size=1, max_size=400))
def test_pack_keeps_every_request_under_400000_bytes(sizes: list[int]) -> None:
    batches = pack(sizes)
    assert [i for b in batches for i in b] == list(range(len(sizes)))
    for batch in batches:
        assert len(batch) <= 250
        body = json.dumps({"contacts": ["x" * (sizes[i] - 2) for i in batch]})
        assert len(body.encode()) < MAX_BYTES or len(batch) == 1


def test_encoded_size_matches_json() -> None:
    entry = contact_entry("ü@b.com", {"1": 1}, {}, {})
    assert encoded_size(entry) == len(json.dumps(entry).encode())


def test_poll_delay_starts_at_expected_and_backs_off_to_a_cap() -> None:
    assert next_poll_delay(0, 2.0) == 2.0
    assert next_poll_delay(0, 0.1) == 1.0
    assert next_poll_delay(1, 3.0) == 1.5  # just early: soon again
    assert next_poll_delay(1, 1.5) == 1.0  # never sooner than a second
    assert next_poll_delay(2, 2.0) == 3.0
    assert next_poll_delay(3, 2.0) == 4.5
    assert next_poll_delay(30, 2.0) == 30.0
    assert next_poll_delay(10**6, 2.0, cap=60.0) == 60.0  # no overflow for a stuck import


def script(*replies: Reply) -> tuple[Callable[[ApiCall], Reply], list[ApiCall]]:
    """A ``send`` that answers with ``replies`` in order and records what was sent."""
    sent: list[ApiCall] = []
    queue = list(replies)

    def send(call: ApiCall) -> Reply:
        sent.append(call)
        return queue.pop(0)

    return send, sent


def ok(body: object) -> Reply:
    return Reply(200, "application/json", json.dumps(body).encode())


def refused(reasons: list[object]) -> Reply:
    body = {"success": 0, "message": "did not pass validation", "failureReasons": reasons}
    return Reply(400, "application/json", json.dumps(body).encode())


def entries(n: int) -> list[dict[str, object]]:
    return [{"email": f"p{i}@example.com", "subscribe": [{"listid": "1"}]} for i in range(n)]


def test_submit_sets_refused_contacts_aside_and_sends_the_rest_again() -> None:
    send, sent = script(refused([{"contact": 2, "failureReason": "bad"}]), ok({"batchId": "b1"}))
    result = run_sync(submit_import(entries(4)), send)
    assert result.batch_id == "b1" and result.sent == [0, 1, 3] and result.rejected == [2]
    assert result.requests == 2
    assert [c["email"] for c in sent[1].body["contacts"]] == [  # type: ignore[index]
        "p0@example.com",
        "p1@example.com",
        "p3@example.com",
    ]


def test_refusal_naming_no_contact_of_the_request_sends_them_per_contact_not_again() -> None:
    """An index outside the request (or none at all) must not resend the same import for
    ever: every contact goes per contact, where AC names its own error."""
    for reasons in ([{"contact": 7, "failureReason": "?"}], ["free text"], []):
        send, sent = script(refused(reasons))
        result = run_sync(submit_import(entries(3)), send)
        assert len(sent) == 1
        assert result.rejected == [0, 1, 2] and result.batch_id is None
        assert isinstance(result.error, PermanentApiError)


def test_import_limit_and_transport_failures_leave_the_outcome_to_the_caller() -> None:
    limit = Reply(400, "application/json", b'{"message": "Rate limit exceeded."}')
    result = run_sync(submit_import(entries(2)), script(limit)[0])
    assert isinstance(result.error, RateLimited) and result.sent == [0, 1]
    result = run_sync(submit_import(entries(2)), script(Reply(failure="timeout"))[0])
    assert isinstance(result.error, TransientApiError) and result.sent == [0, 1]


def test_failed_indexes_reads_only_integer_indexes() -> None:
    error = PermanentApiError(
        400, "error", "x", {"failureReasons": [{"contact": 1}, {"contact": True}, {"contact": "2"}]}
    )
    assert failed_indexes(error) == {1}


def test_verify_exits_asks_known_ids_in_hundreds_and_unknown_ones_by_email() -> None:
    emails: dict[str, str | None] = {f"k{i}@x.com": str(i) for i in range(150)}
    emails["u@x.com"] = None
    page1 = ok({"contacts": [{"id": "3", "email": "k3@x.com"}], "meta": {"total": "1"}})
    page2 = ok({"contacts": [], "meta": {"total": "0"}})
    by_email = ok({"contacts": [{"id": "900", "email": "U@x.com"}], "meta": {"total": "1"}})
    send, sent = script(page1, page2, by_email)
    result = run_sync(verify_exits("7", emails), send)
    assert result.subscribed == {"k3@x.com": "3", "u@x.com": "900"}
    assert result.reads == 3
    first = dict(p for p in sent[0].params if p[0] != "ids[]")
    assert first["listid"] == "7" and first["status"] == "1"
    assert sum(1 for p in sent[0].params if p[0] == "ids[]") == 100
    assert ("email", "u@x.com") in sent[2].params
