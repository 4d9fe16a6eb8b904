"""Prune a model's weights in place: allocation x local pruner x calibration data, block by block.

Which linears: every ``nn.Linear`` inside the vision tower's blocks and the language model's decoder
layers (or those whose names match `patterns`); embeddings, projector, merger and ``lm_head`` are never
touched. How sparse each one gets (`method`, see `allocators.py` and `allocation.py`):

* ``"uniform"``: every linear at `sparsity`;
* ``"owl"``: OWL (Yin et al. 2023, https://arxiv.org/abs/2310.05175): units with more Wanda outliers
  (scores above `owl_m` times the unit's mean, default 5) in the dense model get lower sparsity, the
  sparsities spanning ``2 * owl_lambda`` (default 0.08), as OWL's released code;
* ``"ecoflap"``: ECoFLaP (Sung et al. 2023, https://arxiv.org/abs/2310.02998): each unit's importance
  on the calibration loss (the next-token cross-entropy of the calibration inputs on themselves, whole
  model), then kept weights handed out in proportion. As ECoFLaP's released code by default:
  `order` ``"zeroth"`` perturbs each weight matrix alone (`zeroth_mode` ``"per-matrix"``) and scores
  it by ``|g|`` (`score` ``"grad"``, ECoFLaP's GradOnly); ``"first"`` takes real gradients of one
  sample at a time and scores ``|w| * mean |grad|`` (``"grad-weight"``, ECoFLaP's GradMagAbs); the
  allocation (`allocation` ``"released"``) gives every unit ``1 - (sparsity + cap)`` first and shares
  the rest of the budget in proportion to the block totals. vlmprune's earlier choices stay
  selectable: ``zeroth_mode="block"`` (the whole block perturbed at once), ``score="grad-weight"``
  for zeroth order, ``allocation="clamped"`` (keep fractions proportional, within ``sparsity +- cap``).

A unit is one linear (``granularity="layer"``) or all selected linears of one block, a decoder layer or a
vision block (``"block"``, the papers' choice, sharing one sparsity). Every allocation keeps the
parameter-weighted mean of the allocated sparsities over the pruned linears equal to `sparsity`. Then
the local pruner (`local`: ``"wanda"``, ``"sparsegpt"``, ``"magnitude"``) zeroes each linear at its
sparsity, block by block on the outputs of the already-pruned blocks (`calibrate.blockwise`; a pruner
that needs no input statistics runs without calibration). Allocations and local pruners are looked up
by name in `registry.py`, where your own register too. An N:M pattern (``nm="2:4"``) fixes every
linear at ``1 - N/M`` and works with ``method="uniform"`` only::

    import vlmprune
    from vlmprune.weights import WeightPruneConfig, calibration_batches, prune_weights, save_pruned

    pm = vlmprune.load("testbed")
    batches = calibration_batches(pm.model, pm.processor, n=64)          # FashionScenes training scenes
    report = prune_weights(pm, batches, WeightPruneConfig(method="ecoflap", local="wanda", sparsity=0.6))
    print(report.summary())
    save_pruned(pm, pm.processor, report, "pruned-testbed")            # a normal transformers checkpoint
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VlmpruneError
from ..memory import peak_memory_growth
from .calibrate import Stack, blockwise, find_stacks, select_linears
from .config import WeightPruneConfig, config_of
from .local import Pattern
from .registry import ALLOCATIONS, PRUNERS, AllocationInputs, LocalPruner, Unit

RECORDED = ("order", "cap", "allocation", "zeroth_mode", "score", "owl_lambda", "owl_m", "score_samples", "score_directions")


@dataclass
class SparsityReport:
    """What `prune_weights` did. ``achieved``: each pruned linear's share of exact zeros after pruning
    (full module name -> share); ``allocated``: the sparsity it was given; ``overall``: zeros / weights
    over all pruned linears. Local pruners round each count down (``floor``), so achieved can sit a few
    weights below allocated.

    ``units``: every allocation unit (a block, or a linear with ``granularity="layer"``) in model order,
    ``{"name", "params", "score", "allocated"}``: its parameter count over the pruned linears, the score
    the allocation read (ECoFLaP: the unit's importance total; OWL: its outlier share; uniform: None)
    and the sparsity it got, so the allocation can be re-derived from the scores:
    ``ecoflap_allocate(scores, target, sizes=params, cap=cap)`` (``allocation="released"``),
    ``allocate([s / n ...], target, cap=cap, sizes=params)`` (``"clamped"``),
    ``owl_sparsities(scores, target, lam=owl_lambda, sizes=params)`` (OWL); for any registered
    allocation, `unit_sparsities`.

    The fields marked "only" are the allocation's own (`registry.Allocation.record`); None otherwise."""

    model_type: str
    method: str
    local: str
    target: float
    nm: str | None
    granularity: str
    order: str | None  # ECoFLaP only
    cap: float | None  # ECoFLaP only
    allocation: str | None  # ECoFLaP only: "released" or "clamped"
    zeroth_mode: str | None  # ECoFLaP zeroth order only: "per-matrix" or "block"
    score: str | None  # ECoFLaP only: "grad" or "grad-weight"
    owl_lambda: float | None  # OWL only
    owl_m: float | None  # OWL only
    seed: int
    overall: float
    pruned_params: int
    allocated: dict[str, float]
    achieved: dict[str, float]
    calibration_samples: int
    calibration_batches: int
    score_samples: int | None  # ECoFLaP: calibration samples its importance scores used
    score_directions: int | None  # ECoFLaP zeroth order: random directions per block (one per scored piece)
    allocation_seconds: float  # the coarse step (scores and allocation)
    seconds: float  # allocation and local pruning together
    peak_memory_bytes: int  # growth above the memory in use before the call (the model's own weights excluded)
    memory_method: str  # how it was measured (vlmprune/memory.py)
    units: list[dict]  # {"name", "params", "score", "allocated"} per allocation unit (see above)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        what = f"{self.method} x {self.local}" + (f" {self.nm}" if self.nm else f" at sparsity {self.target:g}")
        values = list(self.achieved.values())
        lines = [
            f"{what}: {self.overall:.4f} of {self.pruned_params:,} weights in {len(values)} linears zeroed "
            f"(per linear {min(values):.3f} .. {max(values):.3f})",
            f"calibration: {self.calibration_samples} samples in {self.calibration_batches} batches; "
            f"{self.seconds:.1f} s ({self.allocation_seconds:.1f} s allocating); "
            f"peak memory +{self.peak_memory_bytes / 2**20:.0f} MiB",
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


def unwrap_model(model_or_pm) -> nn.Module:
    """The transformers model of a `PrunedModel` (or the model itself); else a clear error."""
    model = getattr(model_or_pm, "model", None) if not isinstance(model_or_pm, nn.Module) else model_or_pm
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise VlmpruneError(f"give a transformers model or a vlmprune PrunedModel, got {type(model_or_pm).__name__}")
    return model


def _check_batches(batches, needed: bool) -> list[Mapping]:
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
        raise VlmpruneError("calib_batches must be a list of model-input dicts (input_ids, attention_mask, pixel_values, ...)")
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise VlmpruneError(f"calibration batch {i} must be a dict with input_ids [batch, length] (and the model's other inputs)")
    if needed and not batches:
        raise VlmpruneError("this method needs calibration data; give at least one calibration batch")
    return list(batches)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _units(stacks: Sequence[Stack], linears: Mapping[str, nn.Linear], granularity: str) -> list[Unit]:
    """The allocation units in model order: one per linear, or one per block holding a selected linear."""
    if granularity == "layer":
        return [Unit(name, {name: m}) for name, m in linears.items()]
    units = []
    for stack in stacks:
        for i in range(len(stack.blocks)):
            prefix = f"{stack.path}.{i}."
            found = {name: m for name, m in linears.items() if name.startswith(prefix)}
            if found:
                units.append(Unit(f"{stack.path}.{i}", found))
    return units


def unit_sparsities(cfg: WeightPruneConfig, params: Mapping[str, int], scores: Mapping[str, float] | None) -> dict[str, float]:
    """The allocation step alone, `cfg.method`'s: ``{unit: sparsity}`` from the units' parameter
    counts and scores (a report's ``units``: ``{u["name"]: u["params"]}``, ``{u["name"]: u["score"]}``),
    checked; a target of 0 prunes nothing, whatever the allocation."""
    if cfg.target == 0:
        return {unit: 0.0 for unit in params}
    entry = ALLOCATIONS[cfg.method]
    shares = entry.allocate(params, None if entry.scores is None else scores, cfg)
    if not isinstance(shares, Mapping) or set(shares) != set(params):
        raise VlmpruneError(f"allocation {cfg.method!r} must return {{unit name: sparsity}} for exactly the units "
                            f"{', '.join(params)}; it returned {shares!r}")
    for unit, s in shares.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise VlmpruneError(f"allocation {cfg.method!r} gave unit {unit} the sparsity {s!r}; a sparsity is a number in [0, 1)")
    return {unit: float(shares[unit]) for unit in params}


def sparsities_from_scores(cfg: WeightPruneConfig, scores: Sequence[float] | None, sizes: Sequence[int]) -> list[float]:
    """`unit_sparsities` for units given as lists in model order (scores and parameter counts)."""
    params = {str(i): n for i, n in enumerate(sizes)}
    return list(unit_sparsities(cfg, params, None if scores is None else dict(zip(params, scores))).values())


def _allocate(cfg: WeightPruneConfig, inputs: AllocationInputs,
              given: Mapping[str, float] | None = None) -> tuple[dict[str, float], dict[str, float] | None]:
    """(sparsity per unit, the score per unit the allocation read, or None without a score step);
    `given` scores stand in for the score step."""
    entry = ALLOCATIONS[cfg.method]
    if given is not None:
        if entry.scores is None:
            raise VlmpruneError(f"allocation {cfg.method!r} reads no scores; leave out scores=")
        names = [u.name for u in inputs.units]
        if set(given) != set(names):
            missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
            raise VlmpruneError(f"scores= must give exactly this model's units (missing {missing[:3]}, unknown {extra[:3]}); "
                                "pass the units of a report of the same model, patterns and granularity")
        return unit_sparsities(cfg, {u.name: u.params for u in inputs.units}, dict(given)), dict(given)
    scores = None if entry.scores is None or cfg.target == 0 else entry.scores(inputs, cfg)
    return unit_sparsities(cfg, {u.name: u.params for u in inputs.units}, scores), scores


def _prune_linear(linear: nn.Linear, pruner: LocalPruner, stats, sparsity: float, cfg: WeightPruneConfig) -> None:
    if cfg.nm is None and sparsity == 0:
        return
    pattern = Pattern(nm=cfg.pattern_nm) if cfg.nm is not None else Pattern(sparsity=sparsity)
    stats = {name: getattr(stats, name) for name in pruner.needs}  # what the pruner declared, and only that
    pruned = pruner.prune(linear.weight, stats, pattern, cfg)
    if pruned.weight.shape != linear.weight.shape:
        raise VlmpruneError(f"local pruner {pruner.name!r} returned a weight of shape {tuple(pruned.weight.shape)} for "
                            f"{tuple(linear.weight.shape)}; return Pruned(new_weight, keep) of the weight's shape")
    with torch.no_grad():
        linear.weight.copy_(pruned.weight)


def _zero_share(linear: nn.Linear) -> float:
    return (linear.weight == 0).sum().item() / linear.weight.numel()


def _record(cfg: WeightPruneConfig, inputs: AllocationInputs) -> dict:
    """The report's allocation-specific fields: the allocation's record, None for the rest."""
    entry = ALLOCATIONS[cfg.method]
    extra = {} if entry.record is None else dict(entry.record(inputs, cfg))
    unknown = [k for k in extra if k not in RECORDED]
    if unknown:
        raise VlmpruneError(f"allocation {cfg.method!r} records {unknown}, which the report does not hold; choose from {', '.join(RECORDED)}")
    return {key: extra.get(key) for key in RECORDED}


# ----------------------------------------------------------------------------- the pipeline


def prune_weights(model_or_pm, calib_batches: Sequence[Mapping], cfg: WeightPruneConfig | None = None, *,
                  progress: bool = True, scores: Mapping[str, float] | None = None, **options) -> SparsityReport:
    """Prune the model's linears in place as `cfg` says (a `WeightPruneConfig`; or its fields as
    keywords, ``prune_weights(model, batches, method="owl", sparsity=0.6)``, see the module docstring)
    and return a `SparsityReport`. `calib_batches` is a list of model-input dicts (what the model's
    forward takes: input_ids, attention_mask, pixel_values, ...; e.g. `calibration_batches`); an
    allocation without a score step with a pruner that needs no statistics (uniform x magnitude) needs
    none. Cost: one forward per batch per stack to capture block inputs, then two passes of each block
    (statistics, then the pruned outputs); OWL adds one forward per batch, ECoFLaP zeroth-order
    ``2 x linears x pieces`` one-sample forwards (``2 x units x pieces`` with ``zeroth_mode="block"``;
    each skipping the unperturbed blocks before the scored one, `suffix.py`), first-order one backward
    per sample. `scores` (``{unit: score}``, e.g. ``{u["name"]: u["score"] for u in report.units}`` of an
    earlier run with the same scoring options) skips the score step: an allocation at another sparsity
    or with another local pruner from the same importance scores, as the scores do not depend on either."""
    cfg = config_of(cfg, options)
    model = unwrap_model(model_or_pm)
    needed = ALLOCATIONS[cfg.method].scores is not None or bool(PRUNERS[cfg.local].needs)
    batches = _check_batches(calib_batches, needed=needed)
    device = next(model.parameters()).device
    batches = [_to_device(b, device) for b in batches]
    was_training = model.training
    model.eval()  # dropout would make ECoFLaP's paired forwards disagree
    try:  # a long run: sample memory every 5 ms and keep the garbage collector on
        (inputs, allocated, units, times), peak, memory_method = peak_memory_growth(
            lambda: _prune(cfg, model, batches, progress, scores), device, interval=5e-3, pause_gc=False
        )
    finally:
        model.train(was_training)
    linears = {name: m for unit in inputs.units for name, m in unit.linears.items()}
    achieved = {name: _zero_share(m) for name, m in linears.items()}
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    nm_pair = cfg.pattern_nm
    return SparsityReport(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        method=cfg.method,
        local=cfg.local,
        target=cfg.target,
        nm=None if nm_pair is None else f"{nm_pair[0]}:{nm_pair[1]}",
        granularity=cfg.granularity,
        seed=cfg.seed,
        overall=zeros / total,
        pruned_params=total,
        allocated=allocated,
        achieved=achieved,
        calibration_samples=sum(int(b["input_ids"].shape[0]) for b in batches),
        calibration_batches=len(batches),
        allocation_seconds=times[0],
        seconds=times[1],
        peak_memory_bytes=peak,
        memory_method=memory_method,
        units=units,
        **_record(cfg, inputs),
    )


def _prune(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict], progress: bool, given=None):
    """Allocate, then prune every selected linear in place: (the allocation's inputs, allocated
    sparsity per linear, the units' record for the report, (allocation seconds, total seconds))."""
    start = time.perf_counter()
    stacks = find_stacks(model)
    linears = select_linears(model, stacks, cfg.patterns)
    inputs = AllocationInputs(model, batches, stacks, _units(stacks, linears, cfg.granularity))
    shares, scores = _allocate(cfg, inputs, given)
    allocated = {name: shares[unit.name] for unit in inputs.units for name in unit.linears}
    record = [
        dict(name=unit.name, params=unit.params, score=None if scores is None else float(scores[unit.name]),
             allocated=shares[unit.name])
        for unit in inputs.units
    ]
    allocation_seconds = time.perf_counter() - start
    pruner = PRUNERS[cfg.local]
    if not pruner.needs:  # no statistics, so no block replay
        for name, linear in linears.items():
            _prune_linear(linear, pruner, None, allocated[name], cfg)
    else:
        for step in blockwise(model, batches, linears, hessian="hessian" in pruner.needs, progress=progress):
            for name, linear in step.linears.items():
                _prune_linear(linear, pruner, step.stats[name], allocated[name], cfg)
    return inputs, allocated, record, (allocation_seconds, time.perf_counter() - start)
