"""Which AC list an event belongs to (pure), and the cache of list ids (the shell around AC).

An audience maps to the list named by ``LIST_NAME_TEMPLATE`` over the event's fields
(``{audience_name}`` by default; ``{campaign_id}`` and ``{treatment_group}`` let treatment groups
get lists of their own), unless the mapping file names a list id or name for its ``audience_id``.
"""

from __future__ import annotations

import hashlib
import operator
import re
import string
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from service.app.settings import ListTarget
from service.core.coalesce import ListRef
from service.core.errors import PermanentApiError, PoisonMessage
from service.core.model import MembershipEvent

MAX_LIST_NAME = 255


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


class ListApi(Protocol):
    def find_list(self, name: str) -> str | None: ...

    def create_list(self, name: str, stringid: str) -> str: ...


class ListDirectory:
    """Name -> AC list id, cached; creates a missing list when allowed. Thread-safe: one lock
    per name, so concurrent workers never create the same list twice."""

    def __init__(self, api: ListApi, *, create: bool) -> None:
        self._api = api
        self._create = create
        self._ids: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _create_list(self, name: str) -> str:
        try:
            return self._api.create_list(name, stringid_for(name))
        except PermanentApiError as error:
            if error.code != "duplicate":
                raise
            # Another replica (or a person) created it between our lookup and our create: the
            # stringid is derived from the name, so AC refuses the second one. Use theirs.
            found = self._api.find_list(name)
            if found is None:
                raise
            return found

    def cached(self) -> dict[str, str]:
        return dict(self._ids)

    def known(self, ref: ListRef) -> bool:
        """Is the list's id known without asking AC?"""
        return ref.list_id is not None or ref.name in self._ids

    def list_id(self, ref: ListRef) -> str:
        if ref.list_id is not None:
            return ref.list_id
        assert ref.name is not None
        name = ref.name
        found = self._ids.get(name)
        if found is not None:
            return found
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            found = self._ids.get(name)
            if found is not None:
                return found
            found = self._api.find_list(name)
            if found is None:
                if not self._create:
                    raise PermanentApiError(
                        None, "list_missing", "the list does not exist and AC_CREATE_LISTS is off"
                    )
                found = self._create_list(name)
            self._ids[name] = found
            return found
