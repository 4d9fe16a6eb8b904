"""Method options from text: ``NAME=VALUE`` (the CLI's ``--opt``, recipes) parsed by the field itself.

A field's parser is its ``metadata["parse"]`` (`base.opt`), else one read off its annotation: a
budget (``float | int``) by `base.parse_budget` (a plain integer is a count, a number with a point a
share), ``bool`` from true/false/yes/no/1/0, ``int``, ``float``, ``tuple[float, ...]`` from a
comma-separated list, ``str``; an optional field (``| None``) also takes ``none``. `describe` gives
what ``vlmprune methods`` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import VlmpruneError
from .base import parse_budget
from .registry import KINDS, method_class, options_of

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in TRUE or low in FALSE:
        return low in TRUE
    raise ValueError(f"{text!r} is not true or false")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def _type_text(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def field_parser(f: dataclasses.Field) -> Callable[[str], Any]:
    """How `f`'s command-line text becomes its value (see the module doc)."""
    custom = f.metadata.get("parse")
    if custom is not None:
        return custom
    kind = _type_text(f).replace(" ", "")
    optional = "None" in kind.split("|")
    kind = "|".join(p for p in kind.split("|") if p != "None")
    if f.name in ("keep", "keep_layers") or kind in ("float|int", "int|float"):
        base: Callable[[str], Any] = lambda text: parse_budget(text, f.name)  # noqa: E731
    elif kind.startswith("tuple[float") or kind.startswith("Sequence[float"):
        base = _floats
    elif kind.startswith("tuple[int"):
        base = _ints
    else:
        base = {"bool": _bool, "int": int, "float": float, "str": str}.get(kind, str)
    if not optional:
        return base
    return lambda text: None if text.strip().lower() == "none" else base(text)


def parse_options(names: str, items: Sequence[str]) -> dict[str, Any]:
    """``["stages=0.25,0.5", "recycle=0.2"]`` -> ``{"stages": (0.25, 0.5), "recycle": 0.2}``, each
    parsed by the field of that name of the first method in `names` (comma-separated) that has it."""
    classes = [method_class(n.strip()) for n in names.split(",") if n.strip()]
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise VlmpruneError(f"--opt {item!r}: write NAME=VALUE, e.g. --opt stages=0.25,0.5,0.75")
        found = [f for cls in classes for f in options_of(cls) if f.name == name]
        if not found:
            known = sorted({f.name for cls in classes for f in options_of(cls)})
            raise VlmpruneError(f"--opt {name}: {names} has no option {name!r}; its options are {', '.join(known)} "
                                "(`vlmprune methods` lists them with their help)")
        if name in out:
            raise VlmpruneError(f"--opt {name} is given twice; give it once")
        try:
            out[name] = field_parser(found[0])(text)
        except VlmpruneError:
            raise
        except (TypeError, ValueError) as err:
            raise VlmpruneError(f"--opt {name}={text!r}: {err}; {name} is {_type_text(found[0])}") from None
    return out


def describe(name: str) -> dict[str, Any]:
    """What ``vlmprune methods`` prints of method `name`: its kind, budget and options."""
    cls = method_class(name)
    options = []
    for f in options_of(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        options.append(dict(name=f.name, type=_type_text(f), default=default, help=f.metadata.get("help", "")))
    paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    return dict(name=name, cls=cls.__name__, kind=getattr(cls, "kind", None), budget=getattr(cls, "budget", None),
                summary=paragraph, options=options)


def methods_table(names: Sequence[str]) -> str:
    """The registered methods, one block each: name, kind and budget, then an option per line."""
    lines = []
    for name in names:
        d = describe(name)
        lines.append(f"{d['name']}  ({d['cls']}; {d['kind']}: {KINDS.get(d['kind'], '?')}; budget: {d['budget']})")
        if d["summary"]:
            lines.append(f"    {d['summary']}")
        for o in d["options"]:
            lines.append(f"    --opt {o['name']}=  {o['type']}, default {o['default']!r}: {o['help']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
