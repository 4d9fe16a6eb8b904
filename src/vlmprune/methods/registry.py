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


def build_method(name: str, **kwargs: Any):
    """An instance of the method called `name`, configured by `kwargs` (validated by its dataclass)."""
    if name not in METHODS:
        raise VlmpruneError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**kwargs)
