"""``forget``'s plan (``service/core/erasure.py``) and its input (``read_emails``): after the
writes, compaction leaves no value that carries an erased email."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from service.adapters.ledger_store import Intent
from service.app.forget import read_emails
from service.core.erasure import Erasure, latest_values, plan_erasure

A, B, C = "a@example.com", "b@example.com", "c@example.com"


def intent(*emails: str, batch: str | None = "b-1") -> bytes:
    return Intent("i-1", batch, tuple(emails), 1.0).encode()


def emails_of(value: bytes) -> tuple[str, ...]:
    return Intent.decode("-", value).emails


def without(value: bytes, named: frozenset[str]) -> bytes:
    found = Intent.decode("-", value)
    kept = tuple(e for e in found.emails if e not in named)
    return Intent(found.intent_id, found.batch_id, kept, found.submitted_at).encode()


def plan(records: list[tuple[int, bytes, bytes | None]], emails: set[str]) -> Erasure:
    latest = latest_values(records, lambda key: True)
    return plan_erasure(latest, emails, emails_of, without)


def test_last_write_wins_per_partition_and_key() -> None:
    records = [(0, b"k", b"1"), (1, b"k", b"x"), (0, b"k", b"2"), (0, b"j", None)]
    assert latest_values(records, lambda key: key != "j") == {(0, "k"): b"2", (1, "k"): b"x"}


def test_tombstones_where_an_entry_is_live_only() -> None:
    records: list[tuple[int, bytes, bytes | None]] = [
        (2, A.encode(), b"entry"),
        (4, A.encode(), b"entry"),  # a mis-keyed producer: in two partitions
        (1, B.encode(), b"entry"),
        (1, B.encode(), None),  # already forgotten
        (3, C.encode(), b"entry"),  # not asked
        (0, b"import-budget", b"{}"),
    ]
    erasure = plan(records, {A, B})
    assert erasure.tombstones == {A: (2, 4)}
    assert erasure.partitions_of(B) == ()
    assert erasure.writes() == [(2, A, None), (4, A, None)]


def test_intents_naming_an_email_are_rewritten_without_it() -> None:
    records: list[tuple[int, bytes, bytes | None]] = [
        (0, b"import/i-1", intent(A, C)),
        (0, b"import/i-2", intent(C)),
        (1, b"import/i-3", intent(A)),
        (1, b"import/i-3", None),  # settled and deleted
        (2, b"import/bad", b"not json"),
    ]
    erasure = plan(records, {A})
    assert list(erasure.intents) == [(0, "import/i-1")]
    rewrite = erasure.intents[(0, "import/i-1")]
    assert rewrite.emails == (A,)
    assert emails_of(rewrite.value) == (C,)
    assert json.loads(rewrite.value)["batch"] == "b-1"
    assert erasure.intents_naming(A) == 1
    assert erasure.writes() == [(0, "import/i-1", rewrite.value)]


keys = st.sampled_from([A, B, C, "import/i-1", "import/i-2", "import-budget"])


def value_for(key: str, data: st.DataObject) -> bytes | None:
    if data.draw(st.booleans()):
        return None
    if key.startswith("import/"):
        return intent(*data.draw(st.lists(st.sampled_from([A, B, C]), max_size=3)))
    return b"entry"


@given(st.data(), st.frozensets(st.sampled_from([A, B, C]), min_size=1))
def test_after_the_writes_and_compaction_no_latest_value_carries_an_erased_email(
    data: st.DataObject, erased: frozenset[str]
) -> None:
    records: list[tuple[int, bytes, bytes | None]] = []
    for _ in range(data.draw(st.integers(0, 15))):
        key = data.draw(keys)
        records.append((data.draw(st.integers(0, 2)), key.encode(), value_for(key, data)))
    erasure = plan(records, set(erased))
    after = records + [(p, k.encode(), v) for p, k, v in erasure.writes()]
    for (_partition, key), value in latest_values(after, lambda key: True).items():
        if value is None:
            continue
        assert key not in erased
        if key.startswith("import/"):
            assert not set(emails_of(value)) & erased
    # Nothing else is written: a tombstone only where an entry was live.
    live = latest_values(records, lambda key: True)
    for partition, key, value in erasure.writes():
        assert live[(partition, key)] is not None
        assert value is None or key.startswith("import/")


def test_read_emails_normalises_reports_positions_and_never_the_email() -> None:
    text = "# erasure batch 7\n  Alice@Example.COM \n\nbob@example.com\nalice@example.com\n"
    assert read_emails(None, "f", lambda _: text) == (
        [(2, "alice@example.com"), (4, "bob@example.com")],
        [],
    )
    bad = "ok@example.com\nnot-an-email\nsecret\u212a@x.io\n"
    _, problems = read_emails(None, "f", lambda _: bad)
    assert problems == [
        "line 2: not a valid email address",
        "line 3: not a valid email address",
    ]
    assert read_emails("Bob@Example.com", None, lambda _: "") == ([(1, "bob@example.com")], [])
    assert read_emails("nope", None, lambda _: "")[1] == ["the argument: not a valid email address"]
    assert read_emails(None, "f", lambda _: "# only a comment\n") == ([], ["no email given"])
