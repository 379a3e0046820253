"""Which AC list an event belongs to, the directory of list ids, and how a list is found or
created. All pure: the lookups are sans-IO calls (``service/core/acapi.py``) that the pipeline
runs as tasks, one per list, so no two workers ever create the same list.

An audience maps to the list named by ``LIST_NAME_TEMPLATE`` over the event's fields
(``{audience_name}`` by default; ``{campaign_id}`` and ``{treatment_group}`` let treatment groups
get lists of their own), unless the mapping file names a list id or name for its ``audience_id``.
"""

from __future__ import annotations

import hashlib
import operator
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.core.acapi import Call, create_list, find_list, list_exists
from service.core.coalesce import ListRef
from service.core.errors import PermanentApiError, PoisonMessage
from service.core.model import MembershipEvent

MAX_LIST_NAME = 255


@dataclass(frozen=True)
class ListTarget:
    """Where an audience goes when a mapping file names it: an existing list id or a list name."""

    list_id: str | None = None
    list_name: str | None = None


def list_for_event(
    event: MembershipEvent, template: str, mapping: Mapping[str, ListTarget]
) -> ListRef:
    """The list this event's change applies to. ``PoisonMessage`` if the name would be empty."""
    target = mapping.get(event.audience_id)
    if target is not None:
        return ListRef(name=target.list_name, list_id=target.list_id)
    fields = {
        "audience_id": event.audience_id,
        "audience_name": event.audience_name,
        "campaign_id": event.campaign_id or "",
        "treatment_group": event.treatment_group or "",
    }
    name = " ".join(template.format(**fields).split())
    if not name:
        raise PoisonMessage("no_list_name", "the list name template gave an empty name")
    if len(name) > MAX_LIST_NAME:
        raise PoisonMessage("no_list_name", "the list name is longer than 255 characters")
    return ListRef(name=name)


_NAMING_FIELDS = ("audience_id", "audience_name", "campaign_id", "treatment_group")


class ListNamer:
    """``list_for_event`` with a cache: audiences are few and events many, so the template is
    formatted once per distinct combination of the fields that decide the list. Pure; bounded.

    The cache key is made of those fields only (``audience_id`` when a mapping file is given,
    plus the template's fields), read by one ``operator.attrgetter``: with the default
    template it is the audience name itself, so a lookup builds no tuple per record.
    """

    MAX_CACHED = 100_000

    def __init__(self, template: str, mapping: Mapping[str, ListTarget]) -> None:
        self.template = template
        self.mapping = mapping
        self._cache: dict[object, ListRef] = {}
        self._key: Callable[[MembershipEvent], object] = operator.attrgetter(
            *_deciding_fields(template, bool(mapping))
        )

    def __call__(self, event: MembershipEvent) -> ListRef:
        key = self._key(event)
        found = self._cache.get(key)
        if found is None:
            found = list_for_event(event, self.template, self.mapping)
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            self._cache[key] = found
        return found


def _deciding_fields(template: str, mapped: bool) -> tuple[str, ...]:
    """The event fields a list depends on; all four if the template cannot be read (then
    ``list_for_event`` names the problem for each event)."""
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    except ValueError:
        return _NAMING_FIELDS
    if not used or not used <= set(_NAMING_FIELDS):
        return _NAMING_FIELDS
    return tuple(f for f in _NAMING_FIELDS if f in used or (mapped and f == "audience_id"))


def stringid_for(name: str) -> str:
    """A URL-safe stringid, unique per name (a slug plus a short hash of the exact name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "list"
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def resolve_list(ref: ListRef, *, create: bool, sender_url: str, sender_reminder: str) -> Call[str]:
    """The AC id of ``ref``: the mapping's id (checked to exist), or the list of that exact
    name, created when allowed. ``PermanentApiError(list_missing)`` when there is none."""
    if ref.list_id is not None:
        if not (yield from list_exists(ref.list_id)):
            raise PermanentApiError(404, "list_missing", "the mapped list id does not exist")
        return ref.list_id
    assert ref.name is not None
    found = yield from find_list(ref.name)
    if found is not None:
        return found
    if not create:
        raise PermanentApiError(
            None, "list_missing", "the list does not exist and AC_CREATE_LISTS is off"
        )
    try:
        return (
            yield from create_list(ref.name, stringid_for(ref.name), sender_url, sender_reminder)
        )
    except PermanentApiError as error:
        if error.code != "duplicate":
            raise
    # Another replica (or a person) created it between our lookup and our create: the stringid
    # is derived from the name, so AC refuses the second one. Use theirs.
    found = yield from find_list(ref.name)
    if found is None:
        raise PermanentApiError(None, "list_missing", "the list vanished while it was created")
    return found


@dataclass
class ListDirectory:
    """List reference -> AC list id, as learned from AC. Pure state; bounded.

    An id is trusted for ``verify_after`` seconds since it was last confirmed; then the next
    import that needs it checks it first (``stale``): imports skip unknown list ids silently,
    so a deleted list would otherwise be recorded as applied. A per-contact write learns it at
    once (``related_missing`` on the list): ``forget`` drops the id, and the next change of that
    list resolves (or creates) it again.
    """

    verify_after: float = 300.0
    max_lists: int = 10_000
    _ids: dict[ListRef, str] = field(default_factory=dict)
    _confirmed: dict[ListRef, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, ref: ListRef) -> str | None:
        return self._ids.get(ref)

    def known(self, ref: ListRef) -> bool:
        return ref in self._ids

    def full(self) -> bool:
        return len(self._ids) >= self.max_lists

    def learn(self, ref: ListRef, list_id: str, now: float) -> None:
        self._ids[ref] = list_id
        self._confirmed[ref] = now

    def confirm(self, ref: ListRef, now: float) -> None:
        if ref in self._ids:
            self._confirmed[ref] = now

    def stale(self, ref: ListRef, now: float) -> bool:
        return ref in self._ids and now - self._confirmed.get(ref, -1e18) > self.verify_after

    def forget_id(self, list_id: str) -> list[ListRef]:
        """AC says ``list_id`` is gone: every reference to it resolves again."""
        gone = [ref for ref, known in self._ids.items() if known == list_id]
        for ref in gone:
            del self._ids[ref]
            self._confirmed.pop(ref, None)
        return gone

    def ref_of(self, list_id: str) -> ListRef | None:
        for ref, known in self._ids.items():
            if known == list_id:
                return ref
        return None
