"""Methods register explicitly by name (= file name); duplicates fail loudly, unknown names list the known ones."""

from __future__ import annotations

from typing import Any

from ..errors import VlmpruneError

METHODS: dict[str, type] = {}


def register_method(name: str):
    def register(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered by {METHODS[name].__name__}")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return register


def configure(names: str, **options: Any):
    """Methods from a comma-separated list of names and CLI-style options (None = not given).

    Each method takes the options its dataclass has; an option given but taken by none is refused.
    """
    from dataclasses import fields

    given = {k: v for k, v in options.items() if v is not None}
    methods, used = [], set()
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in METHODS:
            raise VlmpruneError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))}")
        accepted = {f.name for f in fields(METHODS[name]) if f.init}
        mine = {k: v for k, v in given.items() if k in accepted}
        used |= set(mine)
        methods.append(METHODS[name](**mine))
    unused = set(given) - used
    if unused:
        raise VlmpruneError(f"option(s) {sorted(unused)} are not taken by {names}; see each method's fields in the README")
    return methods[0] if len(methods) == 1 else methods


def build_method(name: str, **kwargs: Any):
    """An instance of the method called `name`, configured by `kwargs` (validated by its dataclass)."""
    if name not in METHODS:
        raise VlmpruneError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**kwargs)
