"""The built-in allocations, registered by name: ``uniform``, ``owl`` and ``ecoflap``.

Each is a score step that reads the model (none for uniform) and a pure step from the units' scores
and parameter counts to ``{unit: sparsity}`` (the formulas are in `allocation.py`):

* ``uniform``: every unit at the target;
* ``owl``: each unit's outlier share of its Wanda scores ``|W_ij| * ||X_j||_2`` on dense forwards
  (`allocation.owl_scores`, threshold ``cfg.owl_m``), then `allocation.owl_sparsities` (spread
  ``2 * cfg.owl_lambda``);
* ``ecoflap``: each unit's importance on the calibration loss (`samples.calibration_loss`), zeroth
  order (`allocation.zeroth_order_scores` on the scored pieces, the unperturbed prefix replayed by
  `suffix.SuffixLosses`; ``zeroth_batch`` directions per forward, `zeroth_batched.py`) or first order (`allocation.first_order_scores`, one sample at a time), then
  ECoFLaP's released rule (`allocation.ecoflap_allocate`) or the clamped one (`allocation.allocate`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import nn

from ..errors import VlmpruneError
from .allocation import allocate, ecoflap_allocate, first_order_scores, owl_scores, owl_sparsities, zeroth_order_scores
from .calibrate import Stack, dense_input_norms
from .registry import AllocationInputs, register_allocation
from .samples import calibration_loss, first_samples, loss_sums, pieces, split_samples
from .suffix import SuffixLosses
from .zeroth_batched import batched_zeroth_order_scores, stack_directions

if TYPE_CHECKING:
    from .config import WeightPruneConfig

ZEROTH_SCORE_SAMPLES = 4  # ECoFLaP zeroth order: 2 forwards per block per sample, so few samples by default


def _by_unit(params: Mapping[str, int], values: Sequence[float]) -> dict[str, float]:
    return dict(zip(params, values))


# ----------------------------------------------------------------------------- uniform


@register_allocation("uniform")
def uniform_allocation(params: Mapping[str, int], scores, cfg: WeightPruneConfig) -> dict[str, float]:
    """Every unit at the target."""
    return {unit: cfg.target for unit in params}


# ----------------------------------------------------------------------------- OWL


def owl_unit_scores(inputs: AllocationInputs, cfg: WeightPruneConfig) -> dict[str, float]:
    """Each unit's share of Wanda outliers (scores above ``cfg.owl_m`` x the unit's mean), with the
    input norms of ordinary forwards of the dense model."""
    linears = {name: m for unit in inputs.units for name, m in unit.linears.items()}
    norms = dense_input_norms(inputs.model, inputs.batches, linears)
    lod = {}
    for unit in inputs.units:  # one unit's Wanda scores at a time: |W_ij| * ||X_j||
        scores = [m.weight.detach().float().abs() * norms[n][None, :] for n, m in unit.linears.items()]
        lod[unit.name] = owl_scores([scores], m=cfg.owl_m)[0]
    return lod


def owl_record(inputs: AllocationInputs, cfg: WeightPruneConfig) -> dict:
    return dict(owl_lambda=float(cfg.owl_lambda), owl_m=float(cfg.owl_m))


@register_allocation("owl", scores=owl_unit_scores, record=owl_record)
def owl_allocation(params: Mapping[str, int], scores: Mapping[str, float], cfg: WeightPruneConfig) -> dict[str, float]:
    """OWL: more outliers, lower sparsity; the sparsities span ``2 * owl_lambda``."""
    return _by_unit(params, owl_sparsities([scores[u] for u in params], cfg.target, lam=cfg.owl_lambda, sizes=list(params.values())))


# ----------------------------------------------------------------------------- ECoFLaP


def scored_batches(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """The calibration batches ECoFLaP's scores use: the first `score_samples` samples (default:
    `ZEROTH_SCORE_SAMPLES` for zeroth order, all for first)."""
    n = cfg.score_samples or (ZEROTH_SCORE_SAMPLES if cfg.order == "zeroth" else None)
    return batches if n is None else first_samples(batches, n, getattr(model.config, "image_token_id", None))


def zeroth_pieces(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """What zeroth order scores, one random direction each: the scored samples alone, text cut into pieces."""
    image_token_id = getattr(model.config, "image_token_id", None)
    return pieces(split_samples(scored_batches(cfg, model, batches), image_token_id), cfg.score_tokens)


def first_order_samples(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """First order's batches: the scored samples one at a time where the batches split into samples
    (ECoFLaP takes each sample's gradient alone, batch size 1, so signs of different samples do not
    cancel in |grad|); batches that do not split stay whole."""
    return split_samples(scored_batches(cfg, model, batches), getattr(model.config, "image_token_id", None))


def block_of(stacks: Sequence[Stack], linear_name: str) -> tuple[str, int]:
    """(stack name, block index) of the block holding a linear."""
    for stack in stacks:
        if linear_name.startswith(stack.path + "."):
            return stack.name, int(linear_name[len(stack.path) + 1 :].split(".", 1)[0])
    raise VlmpruneError(f"{linear_name} is in no block stack")  # select_linears only picks linears inside blocks


def ecoflap_unit_scores(inputs: AllocationInputs, cfg: WeightPruneConfig) -> dict[str, float]:
    """Each unit's importance total on the calibration loss (zeroth or first order, `cfg.score_kind`)."""
    model, batches, stacks, units = inputs.model, inputs.batches, inputs.stacks, inputs.units
    params = [[m.weight for m in unit.linears.values()] for unit in units]
    if cfg.order == "zeroth":
        where = [block_of(stacks, next(iter(unit.linears))) for unit in units]
        if cfg.zeroth_batch > 1:  # the directions' +- rows stacked, one forward per group (zeroth_batched.py)
            groups = stack_directions(zeroth_pieces(cfg, model, batches), 1, cfg.zeroth_batch)
            suffix = SuffixLosses(model, [g.batch for g in groups], stacks, loss_sums)
            totals = batched_zeroth_order_scores(suffix.losses(), groups, [list(u.linears.values()) for u in units], seed=cfg.seed,
                                                 mode=cfg.zeroth_mode, score=cfg.score_kind, around_block=lambda k: suffix.skipping(*where[k]))
        else:
            suffix = SuffixLosses(model, zeroth_pieces(cfg, model, batches), stacks, calibration_loss)
            totals = zeroth_order_scores(suffix.losses(), params, seed=cfg.seed, mode=cfg.zeroth_mode, score=cfg.score_kind,
                                         around_block=lambda k: suffix.skipping(*where[k]))
    else:
        losses = [functools.partial(calibration_loss, model, b) for b in first_order_samples(cfg, model, batches)]
        totals = first_order_scores(losses, params, score=cfg.score_kind)
    return {unit.name: total for unit, total in zip(units, totals)}


def ecoflap_record(inputs: AllocationInputs, cfg: WeightPruneConfig) -> dict:
    """ECoFLaP's options in use, the samples its scores read and (zeroth order) its directions."""
    model, batches = inputs.model, inputs.batches
    zeroth = cfg.order == "zeroth"
    return dict(
        order=cfg.order, cap=cfg.cap, allocation=cfg.allocation, zeroth_mode=cfg.zeroth_mode if zeroth else None,
        score=cfg.score_kind, score_samples=sum(int(b["input_ids"].shape[0]) for b in scored_batches(cfg, model, batches)),
        score_directions=len(zeroth_pieces(cfg, model, batches)) if zeroth else None,
    )


@register_allocation("ecoflap", scores=ecoflap_unit_scores, record=ecoflap_record)
def ecoflap_allocation(params: Mapping[str, int], scores: Mapping[str, float], cfg: WeightPruneConfig) -> dict[str, float]:
    """Kept weights in proportion to the importance totals: ECoFLaP's released rule, or clamped."""
    totals, sizes = [scores[u] for u in params], list(params.values())
    if cfg.allocation == "released":
        return _by_unit(params, ecoflap_allocate(totals, cfg.target, sizes=sizes, cap=cfg.cap))
    return _by_unit(params, allocate([t / n for t, n in zip(totals, sizes)], cfg.target, cap=cfg.cap, sizes=sizes))
