"""The pruning methods by name (= file name): ``METHODS``, a `vlmprune.registry.Registry` of method
classes. Registration is public::

    @register_method("my-method", kind="before", budget="keep")
    @dataclass(frozen=True)
    class MyMethod:
        keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] or a count")
        def decide(self, pm, prep): ...

A method registered so, in your own module, is usable by name everywhere a built-in one is:
`build_method`, ``prune=``, `AtFlops`, the sweep, lmms-eval's ``model_args`` and the CLI (``--plugin
MODULE``, or a package entry point in the ``vlmprune.methods`` group). The class is the entry and
carries what the rest of vlmprune asks of it: ``method_name``, its `kind` (`KINDS`) and its `budget`
field (`BUDGETS`: ``keep``, a visual-token share or count; ``keep_layers``, a layer share or count; or
None when it has no budget a sweep or a FLOPs target could vary). Its options are its dataclass
fields, whose help text is field metadata (`base.opt`); the CLI builds ``--opt NAME=VALUE`` from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import VlmpruneError
from ..registry import Registry

METHODS: Registry[type] = Registry("pruning method", "method")
KINDS = {
    "before": "decides before the LLM: which visual tokens enter it (a Plan from the inputs)",
    "inside": "decides inside the LLM: which visual tokens leave at which layers (policies on its attention)",
    "layers": "skips decoder layers",
    "hybrid": "decides tokens and layers",
}
BUDGETS = ("keep", "keep_layers")


def register_method(name: str, *, kind: str, budget: str | None = "keep"):
    """Register the decorated method class as `name`, of `kind` (a key of `KINDS`) with the budget
    field `budget` (one of `BUDGETS`, or None); a name registered twice is refused."""
    if kind not in KINDS:
        raise VlmpruneError(f"kind={kind!r} is not one of {', '.join(KINDS)} ({'; '.join(f'{k}: {v}' for k, v in KINDS.items())})")
    if budget is not None and budget not in BUDGETS:
        raise VlmpruneError(f"budget={budget!r} is not one of {', '.join(BUDGETS)} or None")

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not callable(getattr(cls, "decide", None)):
            raise VlmpruneError(f"{cls!r} cannot be registered as a pruning method: it must be a dataclass with "
                                "decide(pm, prep) -> (Plan, [LayerPolicy]) (see methods/protocols.py)")
        if budget is not None and budget not in {f.name for f in dataclasses.fields(cls)}:
            raise VlmpruneError(f"{cls.__name__} is registered with budget {budget!r} but has no such field")
        METHODS.add(name, cls)
        cls.method_name, cls.kind, cls.budget = name, kind, budget
        return cls

    return register


ENTRY_POINTS = "vlmprune.methods"  # installed packages declare their modules here, e.g. mine = "my_pkg.methods"
_entry_points_loaded = False


def load_entry_points() -> None:
    """Import, once, every module that installed packages declare in the ``vlmprune.methods`` entry-point
    group (their registrations run)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as err:  # a broken plugin names itself instead of failing somewhere later
            raise VlmpruneError(f"the {ENTRY_POINTS} entry point {ep.name} = {ep.value!r} failed to load: {err}") from err


def method_class(name: str) -> type:
    """The method class registered as `name` (looking in the installed entry points on a miss); else
    an error that lists the registered methods."""
    if name not in METHODS:
        load_entry_points()
    if name not in METHODS:
        raise VlmpruneError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))} "
                            "(a method of your own: register_method in a module given to --plugin)")
    return METHODS[name]


def options_of(cls: type) -> list[dataclasses.Field]:
    """The fields a user sets: the init fields not filled by a method's own steps (``calibrate``)."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


def configure(names: str, **options: Any):
    """Methods from a comma-separated list of names and CLI-style options (None = not given).

    Each method takes the options its dataclass has; an option given but taken by none is refused.
    """
    given = {k: v for k, v in options.items() if v is not None}
    methods, used = [], set()
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        cls = method_class(name)
        accepted = {f.name for f in options_of(cls)}
        mine = {k: v for k, v in given.items() if k in accepted}
        used |= set(mine)
        methods.append(cls(**mine))
    if not methods:
        raise VlmpruneError("give at least one method name, e.g. fastv")
    unused = set(given) - used
    if unused:
        raise VlmpruneError(f"option(s) {sorted(unused)} are not taken by {names}; `vlmprune methods` lists each method's options")
    return methods[0] if len(methods) == 1 else methods


def build_method(name: str, **kwargs: Any):
    """An instance of the method called `name`, configured by `kwargs` (validated by its dataclass)."""
    return method_class(name)(**kwargs)
