"""Prune a model's weights in place: allocation x local pruner x calibration data, block by block.

Which linears: every ``nn.Linear`` inside the vision tower's blocks and the language model's decoder
layers (or those whose names match `patterns`); embeddings, projector, merger and ``lm_head`` are never
touched. How sparse each one gets (`method`, see `allocation.py`):

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
sparsity, block by block on the outputs of the already-pruned blocks (`calibrate.blockwise`). An N:M
pattern (``nm="2:4"``) fixes every linear at ``1 - N/M`` and works with ``method="uniform"`` only::

    import vlmprune
    from vlmprune.weights import calibration_batches, prune_weights, save_pruned

    pm = vlmprune.load("testbed")
    batches = calibration_batches(pm.model, pm.processor, n=64)          # FashionScenes training scenes
    report = prune_weights(pm, batches, method="ecoflap", local="wanda", sparsity=0.6)
    print(report.summary())
    save_pruned(pm, pm.processor, report, "pruned-testbed")            # a normal transformers checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VlmpruneError
from ..memory import peak_memory_growth
from .allocation import (
    SCORES,
    ZEROTH_MODES,
    allocate,
    ecoflap_allocate,
    first_order_scores,
    owl_scores,
    owl_sparsities,
    uniform,
    zeroth_order_scores,
)
from .calibrate import blockwise, dense_input_norms, find_stacks, model_inputs, select_linears
from .local import Pattern, apply_mask, magnitude_mask, sparsegpt_prune, wanda_mask
from .suffix import SuffixLosses

METHODS = ("uniform", "owl", "ecoflap")
LOCALS = ("wanda", "sparsegpt", "magnitude")
ORDERS = ("zeroth", "first")
GRANULARITIES = ("layer", "block")
ALLOCATIONS = ("released", "clamped")  # ECoFLaP's released rule / vlmprune's clamped proportional fill
OWL_LAMBDA = 0.08  # OWL's README recipe: --Lamda 0.08 --Hyper_m 5
DEFAULT_SPARSITY = 0.5
ZEROTH_SCORE_SAMPLES = 4  # ECoFLaP zeroth order: 2 forwards per block per sample, so few samples by default
ZEROTH_SCORE_TOKENS = 64  # ... and each text sample cut into pieces of this many tokens, one direction each
ROW_KEYS = {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes"}  # inputs that split by sample
OWL_M = 5.0  # OWL's outlier threshold M, in multiples of a unit's mean Wanda score


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VlmpruneError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class WeightPruneConfig:
    """What `prune_weights` does; every field is checked when built (the CLI builds one before loading).

    method: allocation, ``"uniform"``, ``"owl"`` or ``"ecoflap"``.
    local: local pruner, ``"wanda"``, ``"sparsegpt"`` or ``"magnitude"``.
    sparsity: the overall share of the pruned linears' weights to zero, in [0, 1); None: 0.5, or
        ``1 - N/M`` with `nm`.
    nm: an N:M pattern such as ``"2:4"`` (keep N of every M input columns); uniform only.
    order: ECoFLaP's importance, ``"zeroth"`` (forward passes only) or ``"first"`` (backprop).
    granularity: ``"block"`` (one sparsity per decoder layer / vision block) or ``"layer"`` (per linear).
    cap: ECoFLaP's bound: no unit sparser than ``sparsity + cap`` (its ``max_sparsity_per_layer`` =
        target + 0.1 in the released scripts); with ``allocation="clamped"`` also none denser than
        ``sparsity - cap``. OWL does not use it (see `owl_lambda`).
    patterns: module-name patterns of the linears to prune (fnmatch, or ``"re:"`` + a regex); None: all
        linears inside the blocks.
    seed: seeds ECoFLaP's zeroth-order directions.
    score_samples: how many calibration samples (the first ones) ECoFLaP's importance scores use; None:
        `ZEROTH_SCORE_SAMPLES` for zeroth order (its cost grows with blocks x samples), all for first.
        Zeroth order scores each sample alone, with its own random direction, where the batch splits
        into samples (text; LLaVA images), so more directions average out at the same cost.
    score_tokens: zeroth order cuts each (split) text sample into consecutive pieces of this many
        tokens, each scored alone with its own direction: more directions from the same tokens at the
        same cost (with image inputs, samples stay whole); 0: whole samples.
    allocation: ECoFLaP's rule from scores to sparsities: ``"released"`` (ECoFLaP's code,
        `allocation.ecoflap_allocate`) or ``"clamped"`` (vlmprune's earlier rule, `allocation.allocate`).
    zeroth_mode: ECoFLaP zeroth order, what one random direction perturbs: ``"per-matrix"`` (each
        weight matrix alone, ECoFLaP's code; ``2 x linears x pieces`` forwards) or ``"block"`` (the
        whole unit at once; ``2 x units x pieces``).
    score: ECoFLaP's importance per matrix: ``"grad"`` (|gradient|, GradOnly) or ``"grad-weight"``
        (|w| x |gradient|); None: ``"grad"`` for zeroth order, ``"grad-weight"`` for first, as the
        released scripts.
    owl_lambda: OWL's lambda: the allocated sparsities span ``2 * owl_lambda`` (max - min).
    owl_m: OWL's M: a Wanda score above M times its unit's mean is an outlier.
    """

    method: str = "uniform"
    local: str = "wanda"
    sparsity: float | None = None
    nm: str | tuple[int, int] | None = None
    order: str = "zeroth"
    granularity: str = "block"
    cap: float = 0.1
    patterns: tuple[str, ...] | None = None
    seed: int = 0
    score_samples: int | None = None
    score_tokens: int = ZEROTH_SCORE_TOKENS
    allocation: str = "released"
    zeroth_mode: str = "per-matrix"
    score: str | None = None
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("local", self.local, LOCALS)
        _choice("order", self.order, ORDERS)
        _choice("granularity", self.granularity, GRANULARITIES)
        if self.sparsity is not None:
            Pattern(sparsity=self.sparsity)  # a number in [0, 1)
        if self.nm is not None:
            ratio = Pattern(nm=self.nm).ratio
            if self.method != "uniform":
                raise VlmpruneError(
                    f"an N:M pattern fixes every linear at sparsity {ratio:g}, so method={self.method!r} has nothing to "
                    "allocate; use method='uniform' (--method uniform) with nm, or unstructured sparsity"
                )
            if self.sparsity is not None and not math.isclose(self.sparsity, ratio):
                raise VlmpruneError(f"sparsity={self.sparsity!r} disagrees with nm={self.nm!r} (sparsity {ratio:g}); give one of them")
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)) or not math.isfinite(self.cap) or self.cap < 0:
            raise VlmpruneError(f"cap={self.cap!r} must be a finite number >= 0 (e.g. 0.1)")
        if self.patterns is not None:
            object.__setattr__(self, "patterns", (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise VlmpruneError(f"seed={self.seed!r} must be an int")
        if self.score_samples is not None and (
            isinstance(self.score_samples, bool) or not isinstance(self.score_samples, int) or self.score_samples < 1
        ):
            raise VlmpruneError(f"score_samples={self.score_samples!r} must be a positive int (or None for the default)")
        if isinstance(self.score_tokens, bool) or not isinstance(self.score_tokens, int) or self.score_tokens < 0:
            raise VlmpruneError(f"score_tokens={self.score_tokens!r} must be an int >= 0 (tokens per scored piece; 0: whole samples)")
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("zeroth_mode", self.zeroth_mode, ZEROTH_MODES)
        if self.score is not None:
            _choice("score", self.score, SCORES)
        for name, hint in (("owl_lambda", "half the spread of OWL's sparsities, e.g. 0.08"), ("owl_m", "OWL's outlier threshold, e.g. 5")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise VlmpruneError(f"{name}={value!r} must be a finite number >= 0 ({hint})")

    @property
    def target(self) -> float:
        if self.nm is not None:
            return Pattern(nm=self.nm).ratio
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    @property
    def score_kind(self) -> str:
        """The ECoFLaP score in use: `score`, or the released scripts' choice for `order`."""
        return self.score or ("grad" if self.order == "zeroth" else "grad-weight")

    @property
    def pattern_nm(self) -> tuple[int, int] | None:
        return None if self.nm is None else Pattern(nm=self.nm).nm


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
    ``owl_sparsities(scores, target, lam=owl_lambda, sizes=params)`` (OWL)."""

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
    memory_method: str  # how it was measured (eval/memory.py)
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


def _unwrap(model_or_pm) -> nn.Module:
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


def calibration_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's next-token cross-entropy on the batch itself: ``labels`` = input_ids with padding and
    image placeholders set to -100 (or the batch's own ``labels``). A VLM runs whole, tower included."""
    inputs = model_inputs(model, batch)
    labels = batch.get("labels")
    if labels is None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(~mask.bool(), -100)
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None:
            labels = labels.masked_fill(ids == image_id, -100)
    return model(**inputs, labels=labels, use_cache=False).loss


def _units(stacks, linears: Mapping[str, nn.Linear], granularity: str) -> list[tuple[str, list[str]]]:
    """(unit name, its linears' names): one per linear, or one per block holding a selected linear."""
    if granularity == "layer":
        return [(name, [name]) for name in linears]
    units = []
    for stack in stacks:
        for i in range(len(stack.blocks)):
            prefix = f"{stack.path}.{i}."
            names = [name for name in linears if name.startswith(prefix)]
            if names:
                units.append((f"{stack.path}.{i}", names))
    return units


def _block_of(stacks, linear_name: str) -> tuple[str, int]:
    """(stack name, block index) of the block holding a linear."""
    for stack in stacks:
        if linear_name.startswith(stack.path + "."):
            return stack.name, int(linear_name[len(stack.path) + 1 :].split(".", 1)[0])
    raise VlmpruneError(f"{linear_name} is in no block stack")  # select_linears only picks linears inside blocks


def _allocation(cfg: WeightPruneConfig, model, batches, stacks, linears, units) -> tuple[list[float], list[float] | None]:
    """(sparsity per unit, the score per unit the allocation read, or None for uniform)."""
    target = cfg.target
    sizes = [sum(linears[n].weight.numel() for n in names) for _, names in units]
    if cfg.method == "uniform" or target == 0:
        return uniform(len(units), target), None
    if cfg.method == "owl":
        norms = dense_input_norms(model, batches, linears)
        lod = []
        for _, names in units:  # one unit's Wanda scores at a time: |W_ij| * ||X_j||
            scores = [linears[n].weight.detach().float().abs() * norms[n][None, :] for n in names]
            lod += owl_scores([scores], m=cfg.owl_m)
        return sparsities_from_scores(cfg, lod, sizes), lod
    params = [[linears[n].weight for n in names] for _, names in units]
    if cfg.order == "zeroth":
        scored = _zeroth_pieces(cfg, model, batches)
        suffix = SuffixLosses(model, scored, stacks, calibration_loss)
        where = [_block_of(stacks, names[0]) for _, names in units]
        totals = zeroth_order_scores(suffix.losses(), params, seed=cfg.seed, mode=cfg.zeroth_mode, score=cfg.score_kind,
                                     around_block=lambda k: suffix.skipping(*where[k]))
    else:
        totals = first_order_scores([functools.partial(calibration_loss, model, b) for b in _first_order_samples(cfg, model, batches)],
                                    params, score=cfg.score_kind)
    return sparsities_from_scores(cfg, totals, sizes), totals


def sparsities_from_scores(cfg: WeightPruneConfig, scores: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """The allocation step alone: sparsity per unit from the units' scores (ECoFLaP: importance
    totals; OWL: outlier shares) and parameter counts, as `prune_weights` computes it; re-derives a
    report's ``allocated`` from its ``units``."""
    if cfg.method == "uniform" or cfg.target == 0:
        return uniform(len(sizes), cfg.target)
    if cfg.method == "owl":
        return owl_sparsities(scores, cfg.target, lam=cfg.owl_lambda, sizes=sizes)
    if cfg.allocation == "released":
        return ecoflap_allocate(scores, cfg.target, sizes=sizes, cap=cfg.cap)
    return allocate([t / n for t, n in zip(scores, sizes)], cfg.target, cap=cfg.cap, sizes=sizes)


def _first_order_samples(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """First order's batches: the scored samples one at a time where the batches split into samples
    (ECoFLaP takes each sample's gradient alone, batch size 1, so signs of different samples do not
    cancel in |grad|); batches that do not split stay whole."""
    return _split_samples(_scored_batches(cfg, model, batches), getattr(model.config, "image_token_id", None))


def _prune_linear(linear: nn.Linear, local: str, stats, sparsity: float, nm) -> None:
    if not nm and sparsity == 0:
        return
    kw = dict(nm=nm) if nm else dict(sparsity=sparsity)
    if local == "magnitude":
        apply_mask(linear, magnitude_mask(linear.weight, **kw))
    elif local == "wanda":
        apply_mask(linear, wanda_mask(linear.weight, stats.norm, **kw))
    else:
        weight, _ = sparsegpt_prune(linear.weight, stats.hessian, **kw)
        with torch.no_grad():
            linear.weight.copy_(weight)


def _zero_share(linear: nn.Linear) -> float:
    return (linear.weight == 0).sum().item() / linear.weight.numel()


# ----------------------------------------------------------------------------- the pipeline


def prune_weights(
    model_or_pm,
    calib_batches: Sequence[Mapping],
    method: str = "uniform",
    local: str = "wanda",
    sparsity: float | None = None,
    nm: str | tuple[int, int] | None = None,
    order: str = "zeroth",
    granularity: str = "block",
    cap: float = 0.1,
    patterns: str | Sequence[str] | None = None,
    seed: int = 0,
    score_samples: int | None = None,
    score_tokens: int = ZEROTH_SCORE_TOKENS,
    allocation: str = "released",
    zeroth_mode: str = "per-matrix",
    score: str | None = None,
    owl_lambda: float = OWL_LAMBDA,
    owl_m: float = OWL_M,
    progress: bool = True,
) -> SparsityReport:
    """Prune the model's linears in place (see the module docstring and `WeightPruneConfig` for the
    options) and return a `SparsityReport`. `calib_batches` is a list of model-input dicts (what the
    model's forward takes: input_ids, attention_mask, pixel_values, ...; e.g. `calibration_batches`);
    magnitude pruning with uniform allocation needs none. Cost: one forward per batch per stack to
    capture block inputs, then two passes of each block (statistics, then the pruned outputs); OWL adds
    one forward per batch, ECoFLaP zeroth-order ``2 x linears x pieces`` one-sample forwards
    (``2 x units x pieces`` with ``zeroth_mode="block"``; each skipping the unperturbed blocks before
    the scored one, `suffix.py`), first-order one backward per sample."""
    cfg = WeightPruneConfig(method, local, sparsity, nm, order, granularity, cap, patterns, seed, score_samples, score_tokens,
                            allocation, zeroth_mode, score, owl_lambda, owl_m)
    model = _unwrap(model_or_pm)
    batches = _check_batches(calib_batches, needed=not (cfg.method == "uniform" and cfg.local == "magnitude"))
    device = next(model.parameters()).device
    batches = [_to_device(b, device) for b in batches]
    was_training = model.training
    model.eval()  # dropout would make ECoFLaP's paired forwards disagree
    try:  # a long run: sample memory every 5 ms and keep the garbage collector on
        (linears, allocated, units, times), peak, memory_method = peak_memory_growth(
            lambda: _prune(cfg, model, batches, progress), device, interval=5e-3, pause_gc=False
        )
    finally:
        model.train(was_training)
    achieved = {name: _zero_share(m) for name, m in linears.items()}
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    nm_pair = cfg.pattern_nm
    ecoflap = cfg.method == "ecoflap"
    return SparsityReport(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        method=cfg.method,
        local=cfg.local,
        target=cfg.target,
        nm=None if nm_pair is None else f"{nm_pair[0]}:{nm_pair[1]}",
        granularity=cfg.granularity,
        order=cfg.order if ecoflap else None,
        cap=cfg.cap if ecoflap else None,
        allocation=cfg.allocation if ecoflap else None,
        zeroth_mode=cfg.zeroth_mode if ecoflap and cfg.order == "zeroth" else None,
        score=cfg.score_kind if ecoflap else None,
        owl_lambda=float(cfg.owl_lambda) if cfg.method == "owl" else None,
        owl_m=float(cfg.owl_m) if cfg.method == "owl" else None,
        seed=cfg.seed,
        overall=zeros / total,
        pruned_params=total,
        allocated=allocated,
        achieved=achieved,
        calibration_samples=sum(int(b["input_ids"].shape[0]) for b in batches),
        calibration_batches=len(batches),
        score_samples=_score_samples(cfg, model, batches),
        score_directions=len(_zeroth_pieces(cfg, model, batches)) if cfg.method == "ecoflap" and cfg.order == "zeroth" else None,
        allocation_seconds=times[0],
        seconds=times[1],
        peak_memory_bytes=peak,
        memory_method=memory_method,
        units=units,
    )


def _scored_batches(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """The calibration batches ECoFLaP's scores use: the first `score_samples` samples (default:
    `ZEROTH_SCORE_SAMPLES` for zeroth order, all for first)."""
    n = cfg.score_samples or (ZEROTH_SCORE_SAMPLES if cfg.order == "zeroth" else None)
    return batches if n is None else _first_samples(batches, n, getattr(model.config, "image_token_id", None))


def _zeroth_pieces(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> list[dict]:
    """What zeroth order scores, one random direction each: the scored samples alone, text cut into pieces."""
    image_token_id = getattr(model.config, "image_token_id", None)
    return _pieces(_split_samples(_scored_batches(cfg, model, batches), image_token_id), cfg.score_tokens)


def _score_samples(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict]) -> int | None:
    """How many calibration samples ECoFLaP's scores used (None for other methods)."""
    if cfg.method != "ecoflap":
        return None
    return sum(int(b["input_ids"].shape[0]) for b in _scored_batches(cfg, model, batches))


def _first_samples(batches: list[dict], n: int, image_token_id: int | None) -> list[dict]:
    """The first `n` samples: whole batches, the last one cut to size where it splits into samples."""
    out, have = [], 0
    for batch in batches:
        if have >= n:
            break
        rows = int(batch["input_ids"].shape[0])
        if have + rows > n and _splits(batch, image_token_id):
            batch = {k: v[: n - have] for k, v in batch.items()}
            rows = n - have
        out.append(batch)
        have += rows
    return out


def _splits(batch: Mapping, image_token_id: int | None) -> bool:
    """Whether every input of the batch is one row per sample (text; LLaVA with one image per sample:
    every row holds the same, nonzero number of image tokens), so it splits into samples."""
    ids = batch["input_ids"]
    if not (set(batch) <= ROW_KEYS and all(isinstance(v, torch.Tensor) and v.shape[0] == ids.shape[0] for v in batch.values())):
        return False
    if "pixel_values" not in batch:
        return True
    per_row = (ids == image_token_id).sum(-1) if image_token_id is not None else ids.new_zeros(1)
    return bool((per_row > 0).all() and (per_row == per_row[0]).all())


def _split_samples(batches: list[dict], image_token_id: int | None) -> list[dict]:
    """Each splittable batch as one-sample batches, trimmed of padding columns; others as they are."""
    out = []
    for batch in batches:
        if not _splits(batch, image_token_id):
            out.append(batch)
            continue
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            mask = row.get("attention_mask")
            if mask is not None and mask.any():
                kept = mask[0].nonzero()
                start, stop = int(kept[0]), int(kept[-1]) + 1  # left or right padding
                for key in ("input_ids", "attention_mask", "labels"):
                    if key in row:
                        row[key] = row[key][:, start:stop]
            out.append(row)
    return out


def _pieces(batches: list[dict], size: int) -> list[dict]:
    """One-sample text batches cut into consecutive pieces of `size` tokens (a last piece shorter than
    half of `size` joins the one before); batches with image inputs or several rows stay whole."""
    if not size:
        return batches
    out = []
    for batch in batches:
        length = int(batch["input_ids"].shape[1])
        if "pixel_values" in batch or batch["input_ids"].shape[0] != 1 or length < 2 * size:
            out.append(batch)
            continue
        starts = list(range(0, length, size))
        if length - starts[-1] < size / 2:
            starts.pop()
        for a, b in zip(starts, starts[1:] + [length]):
            out.append({k: v[:, a:b] for k, v in batch.items()})
    return out


def _prune(cfg: WeightPruneConfig, model: nn.Module, batches: list[dict], progress: bool):
    """Allocate, then prune every selected linear in place: (linears, allocated sparsity per linear,
    the units' record for the report, (allocation seconds, total seconds))."""
    start = time.perf_counter()
    stacks = find_stacks(model)
    linears = select_linears(model, stacks, cfg.patterns)
    units = _units(stacks, linears, cfg.granularity)
    shares, scores = _allocation(cfg, model, batches, stacks, linears, units)
    allocated = {name: float(s) for (_, names), s in zip(units, shares) for name in names}
    record = [
        dict(name=unit, params=sum(linears[n].weight.numel() for n in names),
             score=None if scores is None else float(scores[i]), allocated=float(shares[i]))
        for i, (unit, names) in enumerate(units)
    ]
    allocation_seconds = time.perf_counter() - start
    if cfg.local == "magnitude":  # needs no statistics, so no block replay
        for name, linear in linears.items():
            _prune_linear(linear, "magnitude", None, allocated[name], cfg.pattern_nm)
    else:
        for step in blockwise(model, batches, linears, hessian=cfg.local == "sparsegpt", progress=progress):
            for name, linear in step.linears.items():
                _prune_linear(linear, cfg.local, step.stats[name], allocated[name], cfg.pattern_nm)
    return linears, allocated, record, (allocation_seconds, time.perf_counter() - start)
