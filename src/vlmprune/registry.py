"""The one registry mechanism: entries by name, in registration order, for every kind of thing a user
may add (pruning methods, model families, weight-pruning allocations and local pruners).

A name registered twice is an error; an unknown name lists the known ones and names the option that
picks one (``method``, ``model_type``, ``local``, ...). It reads like a read-only mapping (``in``,
``[]``, ``get``, iteration over names, ``items``, ``values``); ``add`` and ``remove`` change it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import VlmpruneError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by name, in registration order. Messages name the entries' `kind` and the `option` that
    picks one."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind, self.option = kind, option
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        if not isinstance(name, str) or not name:
            raise VlmpruneError(f"a {self.kind} is registered under a non-empty string name, got {name!r}")
        if name in self._entries:
            raise VlmpruneError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); choose another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister `name` (e.g. a plugin's entry, to register it again)."""
        self[name]
        del self._entries[name]

    def pop(self, name: str, default=None):
        """Unregister `name` if registered; its entry, or `default`."""
        return self._entries.pop(name, default)

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            known = ", ".join(self._entries) or "none yet"
            raise VlmpruneError(f"{self.option}={name!r} is not one of {known} (the registered {self.kind}s)")
        return self._entries[name]

    def get(self, name: object, default=None):
        return self._entries.get(name, default) if isinstance(name, str) else default

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return list(self._entries.items())

    def values(self) -> list[Entry]:
        return list(self._entries.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
