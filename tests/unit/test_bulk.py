import json

from hypothesis import given
from hypothesis import strategies as st

from service.adapters.bulk import (
    MAX_BYTES,
    consent_ids,
    consent_read_mode,
    contact_entry,
    encoded_size,
    next_poll_delay,
    pack,
)
from service.core.coalesce import ListRef


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
    assert next_poll_delay(2, 2.0) == 4.5
    assert next_poll_delay(30, 2.0) == 30.0


def test_consent_read_mode_reads_the_list_while_one_page_holds_its_unsubscribed() -> None:
    assert consent_read_mode(None) == "list"  # unknown: one page says how many there are
    assert consent_read_mode(0) == "list"
    assert consent_read_mode(100) == "list"
    assert consent_read_mode(101) == "ids"


def test_consent_ids_ask_known_contacts_only_about_lists_they_first_entered() -> None:
    vip, news = ListRef(name="VIP"), ListRef(name="News")
    first = {vip: {"known@x.com", "new@x.com"}, news: {"other@x.com"}}
    known = {"known@x.com": "11", "other@x.com": "12", "unchanged@x.com": "13"}
    success = ["11", "12", "13", "99"]  # 99: the contact the import created for new@x.com
    ids = consent_ids(first, known, success)
    assert ids[vip] == ["11", "99"]
    assert ids[news] == ["12", "99"]  # an unknown id is asked about on every list


@given(
    st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(["1", "2", "3", "4"])),
    st.lists(st.sampled_from(["1", "2", "3", "4", "5", "6"]), unique=True),
    st.sets(st.sampled_from("abcdef")),
)
def test_consent_ids_never_leave_out_a_first_entry(known, success, entered) -> None:  # type: ignore[no-untyped-def]
    """Whatever the ledger knows: a first entry's contact is asked about, by its known id or
    because AC reported an id the ledger does not hold."""
    target = ListRef(name="L")
    ids = set(consent_ids({target: entered}, known, success)[target])
    known_values = set(known.values())
    assert {i for i in success if i not in known_values} <= ids
    assert {known[e] for e in entered if e in known} <= ids
