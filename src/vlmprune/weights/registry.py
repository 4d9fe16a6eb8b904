"""The weight-pruning kernels by name: local pruners and allocations, each with one signature.

A **local pruner** zeroes weights of one linear layer::

    @register_pruner("my-pruner", needs=("norm",))
    def my_pruner(weight, stats, pattern, cfg) -> Pruned: ...

``weight`` is ``[out_features, in_features]``; ``stats`` maps each statistic named in `needs` to its
tensor over the layer's calibration inputs (``"norm"``: ``||X_j||_2`` per input column, ``[in]``;
``"hessian"``: ``2/n X^T X``, ``[in, in]``), and only those are collected (no statistic: no calibration
pass at all); ``pattern`` is the `local.Pattern` to reach (unstructured ``sparsity`` or ``nm``);
``cfg`` the whole `WeightPruneConfig`. It returns `Pruned`: the new weight (zero where not kept) and
the bool keep mask.

An **allocation** hands each unit (a block, or a linear with ``granularity="layer"``) its sparsity,
in two steps::

    @register_allocation("my-allocation", scores=my_scores)
    def my_allocation(params, scores, cfg) -> dict[str, float]: ...

``scores(inputs, cfg) -> {unit: score}`` (optional) reads the model: `AllocationInputs` holds the
model, the calibration batches, the block stacks and the units. The allocation itself is pure:
``params`` ``{unit: parameter count}`` in model order, ``scores`` what the score step returned (None
without one), and it returns ``{unit: sparsity}``, a sparsity in [0, 1) for every unit, whose
parameter-weighted mean should be ``cfg.target``. `record(inputs, cfg)` (optional) gives the report's
fields of this allocation (e.g. ECoFLaP's ``order``). Units are named by their module name.

Registration is public: a module of your own that calls these makes the names usable in
`prune_weights` (``local=``, ``method=``) and ``vlmprune prune-weights``. A name registered twice is
an error; an unknown name lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..errors import VlmpruneError
from ..registry import Registry  # the one registry mechanism (also families and methods)

if TYPE_CHECKING:  # annotations only: the kernels' modules sit below the config
    from .calibrate import Stack
    from .config import WeightPruneConfig
    from .local import Pattern

STATS = ("norm", "hessian")  # what a local pruner may ask of a layer's inputs (calibrate.InputStats)

# ----------------------------------------------------------------------------- local pruners


class Pruned(NamedTuple):
    """A local pruner's result: the new weight (zero wherever ``keep`` is False) and the keep mask."""

    weight: torch.Tensor
    keep: torch.Tensor


PruneFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], "Pattern", "WeightPruneConfig"], Pruned]


@dataclass(frozen=True)
class LocalPruner:
    name: str
    prune: PruneFn
    needs: tuple[str, ...]  # statistics of the layer's inputs, from STATS


PRUNERS: Registry[LocalPruner] = Registry("local pruner", "local")


def register_pruner(name: str, needs: Sequence[str] = ()) -> Callable[[PruneFn], PruneFn]:
    """Register ``prune(weight, stats, pattern, cfg) -> Pruned`` as local pruner `name`; `needs` names
    the input statistics it reads (from `STATS`)."""
    needs = (needs,) if isinstance(needs, str) else tuple(needs)
    unknown = [s for s in needs if s not in STATS]
    if unknown:
        raise VlmpruneError(f"local pruner {name!r} needs {unknown}, which calibration does not collect; choose from {', '.join(STATS)}")

    def register(fn: PruneFn) -> PruneFn:
        PRUNERS.add(name, LocalPruner(name, fn, needs))
        return fn

    return register


# ----------------------------------------------------------------------------- allocations


@dataclass(frozen=True)
class Unit:
    """One allocation unit: a block (or a linear) by module name, and its selected linears by full name."""

    name: str
    linears: dict[str, nn.Linear]

    @property
    def params(self) -> int:
        return sum(m.weight.numel() for m in self.linears.values())


@dataclass(frozen=True)
class AllocationInputs:
    """What an allocation's score step may read: the model (dense, in eval mode), the calibration
    batches on its device, its block stacks (`calibrate.find_stacks`) and the units in model order."""

    model: nn.Module
    batches: list[dict]
    stacks: list[Stack]
    units: list[Unit]


AllocateFn = Callable[[Mapping[str, int], "Mapping[str, float] | None", "WeightPruneConfig"], dict[str, float]]
ScoresFn = Callable[[AllocationInputs, "WeightPruneConfig"], dict[str, float]]
RecordFn = Callable[[AllocationInputs, "WeightPruneConfig"], dict]


@dataclass(frozen=True)
class Allocation:
    name: str
    allocate: AllocateFn
    scores: ScoresFn | None = None
    record: RecordFn | None = None


ALLOCATIONS: Registry[Allocation] = Registry("allocation", "method")


def register_allocation(name: str, scores: ScoresFn | None = None, record: RecordFn | None = None) -> Callable[[AllocateFn], AllocateFn]:
    """Register ``allocate(params, scores, cfg) -> {unit: sparsity}`` as allocation `name`, with its
    score step ``scores(inputs, cfg) -> {unit: score}`` (None: it reads no scores) and its report fields
    ``record(inputs, cfg) -> dict`` (None: none)."""

    def register(fn: AllocateFn) -> AllocateFn:
        ALLOCATIONS.add(name, Allocation(name, fn, scores, record))
        return fn

    return register
