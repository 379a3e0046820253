"""The email identity rule (model.py, README "The event contract") against a reference written
out character by character, and the email cache against the rule, on any text: the Unicode
characters that case mappings turn into ASCII among them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.errors import PoisonMessage
from service.core.event_validation import MAX_SPELLING, EmailCache
from service.core.model import is_valid_email, normalise_email, validated_email
from tests.fuzz.bounds import fuzz

ASCII_SPACE = " \t\n\r\x0b\x0c"
# Characters whose Unicode case mappings reach ASCII or look like it, and Unicode spaces.
TRICKY = "\u212a\u212b\u017f\u0130\u0131\uff21\uff41\u00df\u00a0\u2028\u3000\u0085\x1c\u200b"
ALPHABET = st.sampled_from(list("abzAZ09.@-_+'") + list(ASCII_SPACE) + list(TRICKY))

spellings = st.one_of(
    st.text(alphabet=ALPHABET, max_size=30),
    st.text(max_size=30),
    st.builds(
        lambda before, local, domain, after: before + local + "@" + domain + after,
        st.text(alphabet=st.sampled_from(list(ASCII_SPACE) + list(TRICKY)), max_size=4),
        st.text(
            alphabet=ALPHABET.filter(lambda c: c not in ASCII_SPACE + "@"), min_size=1, max_size=12
        ),
        st.sampled_from(["example.com", "EXAMPLE.COM", "b.co", "b\u0130.com", "\u212a.io"]),
        st.text(alphabet=st.sampled_from(list(ASCII_SPACE) + list(TRICKY)), max_size=4),
    ),
)


def reference(raw: str) -> str:
    """The rule, spelled out: trim ASCII whitespace, lower-case A-Z, change nothing else."""
    start, end = 0, len(raw)
    while start < end and raw[start] in ASCII_SPACE:
        start += 1
    while end > start and raw[end - 1] in ASCII_SPACE:
        end -= 1
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in raw[start:end])


def verdict(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except PoisonMessage as poison:
        return ("poison", poison.reason)


@fuzz(600)
@given(spellings)
def test_normalisation_is_the_rule(raw: str) -> None:
    email = normalise_email(raw)
    assert email == reference(raw)
    assert normalise_email(email) == email
    result = verdict(lambda: validated_email(raw))
    if isinstance(result, str):
        assert result == email and result.isascii() and is_valid_email(result)
        # Only ASCII letters changed case: no other character became one of them.
        assert raw.strip(ASCII_SPACE).lower() == result
    else:
        assert not (email and email.isascii() and is_valid_email(email))


@fuzz(200)
@given(st.lists(spellings, max_size=20), st.integers(min_value=0, max_value=20_000))
def test_the_cache_answers_as_the_rule_and_stays_bounded(raws: list[str], padding: int) -> None:
    cache = EmailCache(max_bytes=4000)
    for raw in [*raws, " " * padding + "victim@Example.com", *raws]:
        assert verdict(lambda raw=raw: cache(raw)) == verdict(lambda raw=raw: validated_email(raw))
        assert cache.used <= cache.max_bytes
        assert all(len(key) <= MAX_SPELLING for key in cache)
        assert all(normalise_email(key) == value for key, value in cache.items())


@pytest.mark.parametrize("raw", ["\u212aevin@b.co", "kevin@b.co", "\u017fam@b.co", "bob@\u212a.io"])
def test_case_mappings_never_make_another_persons_address(raw: str) -> None:
    if raw.isascii():
        assert validated_email(raw) == raw
    else:
        with pytest.raises(PoisonMessage) as info:
            validated_email(raw)
        assert info.value.reason == "invalid_email"
