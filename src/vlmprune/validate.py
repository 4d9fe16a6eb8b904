"""Checks of scalar settings (counts, numbers, shares), importable from every floor.

Each check raises `VlmpruneError` with the message its caller gives (naming the setting and the
fix), or, for a share, one built from the setting's name, the interval and a hint. A bool is never
a number here: ``True`` is neither a count nor a share.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import VlmpruneError


def is_integer(value: Any) -> bool:
    """An ``int`` that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a bool (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_integer(value: Any, message: str, minimum: int | None = None, maximum: int | None = None) -> None:
    """`value` is an int (not a bool) in ``minimum..maximum`` (each bound inclusive, None: unbounded)."""
    if (
        not is_integer(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise VlmpruneError(message)


def check_number(value: Any, message: str, minimum: float | None = None, finite: bool = False) -> None:
    """`value` is an int or float (not a bool), ``>= minimum`` when given (NaN never is), finite if asked."""
    if (
        not is_number(value)
        or (finite and not math.isfinite(value))
        or (minimum is not None and not value >= minimum)
    ):
        raise VlmpruneError(message)


def share_interval(allow_zero: bool = True, allow_one: bool = True) -> str:
    """The interval a share lies in, as written in messages: ``[0, 1]``, ``(0, 1]``, ``[0, 1)`` or ``(0, 1)``."""
    return ("[" if allow_zero else "(") + "0, 1" + ("]" if allow_one else ")")


def is_share(value: Any, allow_zero: bool = True, allow_one: bool = True) -> bool:
    """A number (not a bool) in the interval `share_interval` names."""
    if not is_number(value):
        return False
    above = value >= 0 if allow_zero else value > 0
    below = value <= 1 if allow_one else value < 1
    return bool(above and below)


def check_share(name: str, value: Any, hint: str, allow_zero: bool = True, allow_one: bool = True) -> None:
    """`value` is a share in ``[0, 1]`` (``allow_zero`` / ``allow_one`` False open that end).

    The error reads ``{name}={value!r} is outside {interval}: {hint}``; `hint` says what the share
    means or how to fix it (e.g. "give the share kept, e.g. 0.5")."""
    if not is_share(value, allow_zero, allow_one):
        raise VlmpruneError(f"{name}={value!r} is outside {share_interval(allow_zero, allow_one)}: {hint}")
