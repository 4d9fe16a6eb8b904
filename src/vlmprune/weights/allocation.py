"""Allocation: one sparsity per unit (a layer or a block) under one global budget of kept weights.

A unit's sparsity is the share of its weights that the local pruner (`local.py`) zeroes. Every
allocator here keeps the **parameter-weighted mean sparsity equal to the target**:
``sum_i (1 - s_i) * size_i == (1 - target) * sum_i size_i`` (`ecoflap_allocate`: in whole weights,
``floor((1 - target) * sum_i size_i)`` kept, as ECoFLaP's code counts them).

* `uniform`: every unit at the target.
* `ecoflap_allocate`: ECoFLaP's released rule (Sung et al. 2023, "ECoFLaP: Efficient Coarse-to-Fine
  Layer-Wise Pruning for Vision-Language Models", https://arxiv.org/abs/2310.02998; code
  github.com/ylsung/ECoFLaP, ``LayerSparsity.compute_the_sparsity_per_group``): every unit first keeps
  ``ceil(size * (1 - s_max))`` weights, ``s_max = target + cap``, then the rest of the budget goes out
  in proportion to the scores, iteratively, no unit above its size. The default of ``ecoflap``.
* `allocate`: vlmprune's "clamped" rule, a named deviation: the *whole* keep fraction proportional to
  the scores, clamped to ``target +- cap`` (a capped proportional fill solved exactly).
* `owl_scores` / `owl_sparsities`: OWL, layers with more Wanda outliers get lower sparsity (Yin et al.
  2023, "Outlier Weighed Layerwise Sparsity (OWL)", https://arxiv.org/abs/2310.05175; code
  github.com/luuyin/OWL, ``lib/prune_all.py``).
* `first_order_scores` / `zeroth_order_scores`: ECoFLaP's global importance of each block, from real
  gradients or from forward-only (zeroth-order) gradient estimates.

ECoFLaP's coarse step as its released zeroth-order scripts run it (``MEZO-GradOnly_sum``: each weight
matrix perturbed alone, a block's score the sum of its matrices' |projected gradient|; kept counts
handed out in proportion to these block totals)::

    model.eval()  # dropout would make the two forwards of a difference disagree
    blocks = [[m.weight for m in layer.modules() if isinstance(m, nn.Linear)] for layer in decoder_layers]
    losses = [lambda b=b: model(**b).loss for b in calibration_batches]
    totals = zeroth_order_scores(losses, blocks, eps=1e-3)       # per matrix, |g| ("grad")
    sparsity = ecoflap_allocate(totals, target=0.5, sizes=block_sizes(blocks), cap=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from ..errors import VlmpruneError

LossFn = Callable[[], "torch.Tensor | float"]


# ----------------------------------------------------------------------------- validation


def _target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise VlmpruneError(f"target={target!r} is outside [0, 1); give the overall share of weights to zero, e.g. 0.5")
    return float(target)


def _nonneg(name: str, value, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise VlmpruneError(f"{name}={value!r} must be a finite number >= 0 ({hint})")
    return float(value)


def _numbers(name: str, values, n: int | None = None) -> list[float]:
    """A list of finite floats (from a list, tuple or 1-D tensor), of length `n` if given."""
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise VlmpruneError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not out:
        raise VlmpruneError(f"{name} is empty; give one value per unit (layer or block)")
    if not all(math.isfinite(v) for v in out):
        raise VlmpruneError(f"{name} has a NaN or infinite value: {out}; check the calibration run that produced it")
    if n is not None and len(out) != n:
        raise VlmpruneError(f"{name} has {len(out)} values but there are {n} units; give exactly one per unit")
    return out


def _sizes(sizes, n: int) -> list[float]:
    """Parameter counts (default: all 1, i.e. equal units)."""
    if sizes is None:
        return [1.0] * n
    out = _numbers("sizes", sizes, n)
    if min(out) <= 0:
        raise VlmpruneError(f"sizes must all be > 0 (the parameter count of each unit), got {out}")
    return out


def _scores(scores) -> list[float]:
    out = _numbers("scores", scores)
    if min(out) < 0 or max(out) <= 0:
        raise VlmpruneError(
            f"scores must be >= 0 with at least one > 0 (higher = more important = kept more), got {out}; "
            "use importance magnitudes such as first_order_scores or zeroth_order_scores"
        )
    return out


def _weighted_mean(values: list[float], sizes: list[float]) -> float:
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)


# ----------------------------------------------------------------------------- allocation


def uniform(n: int, target: float) -> list[float]:
    """Every one of the `n` units at `target` sparsity."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VlmpruneError(f"n={n!r} must be a positive int (the number of units)")
    return [_target(target)] * n


def allocate(scores, target: float, cap: float = 0.1, sizes=None, cap_below: float | None = None) -> list[float]:
    """Sparsity per unit by vlmprune's **clamped** rule (``allocation="clamped"``; not ECoFLaP's released
    rule, which is `ecoflap_allocate`), keeping weights in proportion to importance under one global budget.

    Rule: ``keep_i = clamp(c * score_i, 1 - s_max, 1 - s_min)`` and ``s_i = 1 - keep_i``, with the one
    scale ``c >= 0`` for which ``sum_i keep_i * size_i = (1 - target) * sum_i size_i`` (the budget is met
    exactly, up to float round-off). Bounds: ``s_max = target + cap`` (no unit sparser; it must stay
    below 1) and ``s_min = max(0, target - cap_below)`` (no unit denser; `cap_below` defaults to `cap`,
    the symmetric band of OWL's lambda; ``cap_below=1`` leaves only ``s >= 0``, like ECoFLaP's released
    code, which bounds only the maximum sparsity).

    `scores` are importance per weight of each unit (>= 0, at least one > 0): a higher score keeps a
    larger fraction, a zero score pins the unit at ``s_max``. `sizes` are the units' parameter counts
    (default: equal). For block totals (`first_order_scores`, `zeroth_order_scores`) pass
    ``total / size`` to keep counts proportional to the totals (ECoFLaP's "sum" aggregation).

    Units with equal scores get equal sparsities; a higher score never gets a higher sparsity.
    Deviation from ECoFLaP's released code (`ecoflap_allocate`): that gives every block ``1 - s_max``
    first and shares only the rest in proportion to the scores (capped at the block's size, bounded
    below by sparsity 0 only); here the whole keep fraction is proportional to the score and clamped at
    both ends, so the spread of the sparsities follows the spread of the scores more closely.
    """
    values = _scores(scores)
    t = _target(target)
    up = _nonneg("cap", cap, "the most a unit's sparsity may exceed the target, e.g. 0.1")
    down = up if cap_below is None else _nonneg("cap_below", cap_below, "the most a unit's sparsity may fall below the target")
    n = _sizes(sizes, len(values))
    if t + up >= 1:
        raise VlmpruneError(f"target + cap = {t + up:g} must stay below 1 (a unit at sparsity 1 is removed); use cap < {1 - t:g}")
    lo, hi = 1 - (t + up), 1 - max(0.0, t - down)  # bounds on each keep fraction
    keep = _capped_fill(values, lo, hi, n, (1 - t) * sum(n))
    if keep is None:
        raise VlmpruneError(
            f"target={t:g} cannot be met with cap={up:g}: the units with score 0 stay at sparsity {t + up:g} and the "
            f"others cannot go below sparsity {1 - hi:g}; raise cap (or cap_below), or give those units positive scores"
        )
    return [1 - k for k in keep]


def _capped_fill(rates: list[float], lo: float, hi: float, sizes: list[float], budget: float) -> list[float] | None:
    """``keep_i = clamp(c * rate_i, lo, hi)`` with ``c`` chosen so that ``sum keep_i * size_i = budget``
    (None when even ``c -> inf`` falls short). The kept total f(c) is continuous, non-decreasing and
    linear between the knots ``lo / rate_i`` and ``hi / rate_i``: find the knot segment that holds the
    budget by bisection, then solve the linear piece exactly."""
    total = sum(sizes)
    if budget <= lo * total:  # cap = 0: everything at the band's one value
        return [lo] * len(rates)
    if budget >= hi * total:  # e.g. target = 0: everything kept
        return [hi] * len(rates)

    def kept(c: float) -> float:
        return sum(min(hi, max(lo, c * r)) * n for r, n in zip(rates, sizes))

    knots = sorted({b / r for r in rates if r > 0 for b in (lo, hi)})
    if kept(knots[-1]) < budget * (1 - 1e-12):  # every positive score at hi, and still short
        return None
    a, b = 0, len(knots) - 1  # the first knot whose kept total reaches the budget
    while a < b:
        mid = (a + b) // 2
        a, b = (mid + 1, b) if kept(knots[mid]) < budget else (a, mid)
    j = a
    c1, f1 = knots[j], kept(knots[j])
    c0 = knots[j - 1] if j else 0.0
    f0 = kept(c0)
    c = c1 if f1 == f0 else c0 + (budget - f0) / (f1 - f0) * (c1 - c0)  # f is linear on [c0, c1]
    return [min(hi, max(lo, c * r)) for r in rates]


def ecoflap_keep_counts(scores, target: float, sizes, cap: float = 0.1) -> list[int]:
    """Kept weights per unit by ECoFLaP's released rule (``allocation="released"``, the default of
    ``method="ecoflap"``); `ecoflap_allocate` turns them into sparsities. ECoFLaP's code:
    ``LayerSparsity.compute_the_sparsity_per_group`` in
    LAVIS/lavis/compression/pruners/layer_single_base_pruner.py (lines 247-314), with ``s_max =
    max_sparsity_per_layer = target + 0.1`` in every released script (e.g. scripts/blip2/ecoflap_zeroth.py
    line 18). In whole weights:

    1. budget ``B = floor((1 - target) * sum_i size_i)`` (line 359); every unit starts at
       ``keep_i = ceil(size_i * (1 - s_max))`` (line 253), so no unit is sparser than ``s_max``;
    2. while ``sum keep < B``: each unit still open gets ``ceil(score_i / sum(open scores) * (B - sum keep))``
       more (line 260); a unit that reaches its size is closed (its score set to 0, line 264) and cut back
       to its size (line 266);
    3. the ceilings can overshoot ``B`` by up to one weight per unit: the excess is taken back from the
       units that keep most (largest first, ties in unit order), none below ``floor(size_i * (1 - s_max))``
       (lines 288-306; here also when the starting counts alone overshoot, e.g. with cap 0).

    `scores` are the units' importance totals (>= 0, at least one > 0; the released scripts' ``_sum``
    aggregation, e.g. `zeroth_order_scores` / `first_order_scores` as they come; pass ``total / size``
    for the ``_avg`` aggregation of the FlanT5 script), `sizes` their parameter counts (positive ints).
    A unit with score 0 stays at ``s_max``. The only other bound is sparsity >= 0 (a unit is never
    denser than dense). Returns ints summing to exactly ``B``.

    Where this differs from the released code, on purpose: step 3 *subtracts* the excess (the released
    line 301 adds it, ``+=``, so its kept total overshoots B by up to two weights per unit); scores and
    shares are float64 (the released code uses float32); a budget that no allocation can meet (the units
    with score 0 pinned at ``s_max``, all others dense) raises a VlmpruneError (the released loop would
    not end)."""
    values = _scores(scores)
    counts = _counts(sizes, len(values))
    s_max = _max_sparsity(_target(target), cap)
    budget = int(sum(counts) * (1 - _target(target)))
    keep = [math.ceil(n * (1 - s_max)) for n in counts]
    open_scores = list(values)
    while sum(keep) < budget:
        total = sum(open_scores)
        if total <= 0:
            raise VlmpruneError(
                f"target={target:g} cannot be met with cap={cap:g}: the units with score 0 stay at sparsity {s_max:g} "
                "and all the others are dense already; raise cap, or give those units positive scores"
            )
        rest = budget - sum(keep)
        keep = [k + math.ceil(v / total * rest) for k, v in zip(keep, open_scores)]
        open_scores = [0.0 if k >= n else v for k, v, n in zip(keep, open_scores, counts)]
        keep = [min(k, n) for k, n in zip(keep, counts)]
    # the loop ends at its first overshoot, where the released code trims (so trimming after it is the
    # same); this also trims the starting counts alone when their ceilings exceed the budget (cap ~ 0)
    excess = sum(keep) - budget
    for i in sorted(range(len(keep)), key=lambda i: -keep[i]):  # stable: ties in unit order
        if excess <= 0:
            break
        take = min(excess, keep[i] - int(counts[i] * (1 - s_max)))
        keep[i] -= take
        excess -= take
    return keep


def ecoflap_allocate(scores, target: float, sizes, cap: float = 0.1) -> list[float]:
    """Sparsity per unit by ECoFLaP's released rule: ``1 - keep_i / size_i`` with `ecoflap_keep_counts`
    (see there: every unit keeps ``1 - s_max`` first, ``s_max = target + cap``, the rest of the global
    budget shared in proportion to the scores, capped at the unit's size)."""
    counts = _counts(sizes, len(_scores(scores)))
    return [1 - k / n for k, n in zip(ecoflap_keep_counts(scores, target, counts, cap), counts)]


def _counts(sizes, n: int) -> list[int]:
    """Parameter counts: positive ints, one per unit (the released rule counts whole weights)."""
    if sizes is None:
        raise VlmpruneError("ECoFLaP's released allocation counts whole weights: give sizes, the parameter count of each unit")
    out = _numbers("sizes", sizes, n)
    if min(out) < 1 or not all(v == int(v) for v in out):
        raise VlmpruneError(f"sizes must be positive whole numbers (the parameter count of each unit), got {out}")
    return [int(v) for v in out]


def _max_sparsity(target: float, cap) -> float:
    up = _nonneg("cap", cap, "the most a unit's sparsity may exceed the target, e.g. 0.1")
    if target + up >= 1:
        raise VlmpruneError(f"target + cap = {target + up:g} must stay below 1 (a unit at sparsity 1 is removed); use cap < {1 - target:g}")
    return target + up


# ----------------------------------------------------------------------------- OWL


def owl_scores(wanda_scores_per_layer: Sequence, m: float = 5.0) -> list[float]:
    """Layerwise outlier distribution (OWL, Sec. 3): for each layer, the share of its Wanda scores
    ``|W_ij| * ||X_j||_2`` that exceed `m` times the layer's mean score,
    ``LOD_l = #{A_ij > m * mean(A^l)} / numel(A^l)``, a fraction in [0, 1] (the paper reports percent).

    Each entry is one layer's scores: a tensor, or a sequence of tensors (e.g. every linear of a decoder
    layer, pooled as OWL's code does before taking the mean: lib/prune_all.py lines 943-947, with
    ``check_outlier_mean`` at lines 139-154, which counts ``W > M * mean(W)`` in percent)."""
    m = _nonneg("m", m, "the outlier threshold in multiples of the layer's mean score; OWL uses 5")
    layers = [] if isinstance(wanda_scores_per_layer, torch.Tensor) else list(wanda_scores_per_layer)
    if not layers:
        raise VlmpruneError("give a list with one entry per layer: its Wanda scores (a tensor or a list of tensors)")
    return [_outlier_share(_pool(layer, i), m) for i, layer in enumerate(layers)]


def _pool(layer, index: int) -> torch.Tensor:
    parts = [layer] if isinstance(layer, torch.Tensor) else list(layer)
    if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise VlmpruneError(f"layer {index}: give its Wanda scores as a tensor or a non-empty list of tensors")
    flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in parts])  # (numel,)
    if flat.numel() == 0 or not torch.isfinite(flat).all():
        raise VlmpruneError(f"layer {index}: its Wanda scores are empty or not finite; check the calibration statistics")
    return flat


def _outlier_share(scores: torch.Tensor, m: float) -> float:
    return (scores > m * scores.mean()).sum().item() / scores.numel()


def owl_sparsities(lod, target: float, lam: float = 0.08, sizes=None) -> list[float]:
    """OWL's sparsity per layer from its outlier share `lod` (`owl_scores`), as OWL's released code
    computes it (github.com/luuyin/OWL, lib/prune_all.py, ``prune_wanda_outlier`` lines 962-966; the
    SparseGPT and magnitude variants, lines 1323-1327 and 629-633, are the same)::

        x_l = (LOD_l - min LOD) / (max LOD - min LOD) * 2 * lam     # min-max to [0, 2 lam]
        keep_l = x_l - mean(x) + (1 - target)                       # s_l = 1 - keep_l

    More outliers -> lower sparsity; the sparsities span exactly ``2 * lam`` (max - min) and average to
    `target`. So lambda bounds the *spread*, not the distance from the target: the paper states the
    band as ``[target - lam, target + lam]``, which the code keeps only when the mean of x sits at lam
    (e.g. LODs spread symmetrically); otherwise a layer can be up to ``2 * lam`` from the target. The
    README's recipe is lam = 0.08 with M = 5 (`owl_scores`). Equal LODs (or lam = 0) give the uniform
    allocation (the released code would divide by zero).

    Deviations, both for the budget: with `sizes`, the mean is parameter-weighted (the released code
    averages over LLaMA's equal decoder layers, ``np.mean``; a VLM's vision and language blocks differ
    in size, and only the weighted mean keeps the kept total exact; equal sizes give the released
    numbers); a layer pushed out of [0, 1) is an error that names the largest usable lam (the released
    code sets a sparsity <= 0 to 0.01, lines 1057-1058, which breaks the budget, and has no check at 1)."""
    d = _numbers("lod", lod)
    t = _target(target)
    lam = _nonneg("lam", lam, "half the spread of the layer sparsities; OWL uses 0.08")
    n = _sizes(sizes, len(d))
    if max(d) == min(d) or lam == 0:
        return [t] * len(d)
    x = [2 * (v - min(d)) / (max(d) - min(d)) for v in d]  # in [0, 2]: per unit of lam
    u = [v - _weighted_mean(x, n) for v in x]  # s_l = t - lam * u_l
    sparsity = [t - lam * v for v in u]
    if min(sparsity) < -1e-12 or max(sparsity) >= 1:
        limit = min(t / max(u), (1 - t) / -min(u))
        raise VlmpruneError(f"lam={lam:g} puts some layer's sparsity outside [0, 1) at target={t:g}; use a lam of at most {limit:.4g}")
    return [max(0.0, s) for s in sparsity]


# ----------------------------------------------------------------------------- ECoFLaP scores


def block_sizes(blocks: Sequence) -> list[int]:
    """The parameter count of each block (a module, or a list of parameters)."""
    return [sum(p.numel() for p in params) for params in _block_params(blocks)]


def _block_params(blocks: Sequence) -> list[list[torch.Tensor]]:
    """Each block's tensors: a module's parameters or the given ones; none empty, none shared. An
    nn.ModuleList / nn.Sequential counts as the list of its children."""
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        blocks = list(blocks)
    if isinstance(blocks, (nn.Module, torch.Tensor)) or not len(blocks):
        raise VlmpruneError("blocks must be a non-empty list: each entry one block (an nn.Module or a list of its parameters)")
    groups, seen = [], set()
    for i, block in enumerate(blocks):
        params = list(block.parameters()) if isinstance(block, nn.Module) else list(block)
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise VlmpruneError(f"block {i} has no parameters, or holds something other than tensors; give a module or a list of its parameters")
        if any(id(p) in seen for p in params):
            raise VlmpruneError(f"block {i} shares a parameter with an earlier block; give every parameter to one block only")
        seen.update(id(p) for p in params)
        groups.append(params)
    return groups


def _loss_fns(loss_fn) -> list[LossFn]:
    fns = [loss_fn] if callable(loss_fn) else list(loss_fn) if isinstance(loss_fn, (list, tuple)) else []
    if not fns or not all(callable(f) for f in fns):
        raise VlmpruneError("loss_fn must be a callable taking no argument and returning the scalar loss, or a list of them (one per calibration batch)")
    return fns


def _scalar(loss) -> torch.Tensor:
    loss = loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    if loss.numel() != 1:
        raise VlmpruneError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return one scalar loss (e.g. its mean)")
    return loss.reshape(())


SCORES = ("grad", "grad-weight")  # ECoFLaP's GradOnly / GradMagAbs
ZEROTH_MODES = ("per-matrix", "block")


def score_kind(score: str) -> str:
    if score not in SCORES:
        raise VlmpruneError(f"score={score!r} is not one of {', '.join(SCORES)} (grad: |gradient| only; grad-weight: |w| x |gradient|)")
    return score


def first_order_scores(loss_fn, blocks: Sequence, score: str = "grad-weight") -> list[float]:
    """Each block's first-order importance from real backprop, averaged over the calibration batches
    (`loss_fn` a list: one callable per batch, each returning that batch's scalar loss with autograd on):

    * ``"grad-weight"`` (default): ``sum_{w in block} |w| * mean_batches |dL/dw|``, ECoFLaP's
      ``GradMagAbs`` (LAVIS/lavis/compression/pruners/layer_single_base_pruner.py lines 446-467), the
      score of its released first-order script (scripts/blip2/ecoflap_first.py, ``GradMagAbs_sum``);
    * ``"grad"``: ``sum_{w in block} mean_batches |dL/dw|``, ECoFLaP's ``GradOnly`` (line 469).

    ECoFLaP computes these on batches of one sample (the pruning loader's batch size defaults to 1,
    evaluate_blip.py line 275), so gradient signs of different samples do not cancel: give one callable
    per sample for the released score (`prune_weights` does where the batches split into samples).
    Parameters get ``requires_grad`` for the call and have it restored after."""
    kind = score_kind(score)
    groups, fns = _block_params(blocks), _loss_fns(loss_fn)
    flat = [p for params in groups for p in params]
    totals = [0.0] * len(groups)
    with _requiring_grad(flat), torch.enable_grad():
        for fn in fns:
            loss = _scalar(fn())
            if not loss.requires_grad:
                raise VlmpruneError("the loss does not depend on the blocks' parameters with autograd on; do not wrap loss_fn in torch.no_grad")
            it = iter(torch.autograd.grad(loss, flat, allow_unused=True))
            for b, params in enumerate(groups):  # sum |w| * mean |g| = mean sum |w| |g|: no accumulator needed
                totals[b] += sum(_abs_product(p, next(it), kind == "grad-weight") for p in params)
    return [t / len(fns) for t in totals]


def _abs_product(p: torch.Tensor, g: torch.Tensor | None, weighted: bool) -> float:
    """``sum |w| |g|`` (or ``sum |g|``) of one tensor."""
    if g is None:
        return 0.0
    g = g.detach().double().abs()
    return (p.detach().double().abs() * g).sum().item() if weighted else g.sum().item()


@contextmanager
def _requiring_grad(params: list[torch.Tensor]):
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def zeroth_order_scores(
    loss_fn,
    blocks: Sequence,
    eps: float = 1e-3,
    n_directions: int = 1,
    seed: int = 0,
    mode: str = "per-matrix",
    score: str = "grad",
    around_block: Callable[[int], AbstractContextManager] | None = None,
) -> list[float]:
    """Each block's importance from forward passes only (ECoFLaP's zeroth-order gradient, MeZO-style).

    A direction perturbs some weights ``w`` by ``+- eps z``, ``z ~ N(0, I)``, everything else fixed, and
    takes the projected gradient ``g = (L(w + eps z) - L(w - eps z)) / (2 eps)`` (the central difference
    of L along z; ``g z`` estimates the gradient). What one direction perturbs (`mode`):

    * ``"per-matrix"`` (default, ECoFLaP's released code): each tensor of the block alone, so a block
      gets one |g| per tensor (give the 2-D weight matrices, as `prune_weights` does and ECoFLaP's code
      selects them: ``len(v.shape) == 2``, LAVIS/lavis/compression/pruners/wanda_pruner.py line 732).
      ``LayerSparsity.compute_importance_scores_mezo`` (layer_single_base_pruner.py lines 488-561)
      loops over the matrices (line 512), the batches (517) and ``num_noise`` directions (523, default
      1), perturbs the one matrix by +eps z, -2 eps z, +eps z (lines 530-539, eps = 1e-3) and sums
      ``|g|`` (547-549);
    * ``"block"`` (vlmprune's earlier default, a deviation): all of the block's tensors at once, one
      |g| per block and direction; about ``tensors per block`` times fewer forwards.

    The direction's score (`score`): ``"grad"`` (default): ``|g|``, ECoFLaP's ``MEZO-GradOnly`` (line
    553), the score of every released zeroth-order script (``MEZO-GradOnly_sum`` for BLIP-2, EVA-CLIP,
    CLIP; ``_avg`` for FlanT5); ``"grad-weight"`` (vlmprune's earlier default, a deviation):
    ``sum_w |w| * |g z|``, the first-order importance |w * grad| with the estimated gradient (ECoFLaP's
    ``MEZO-GradMagAbs``, line 556, is ``|g| * sum |w|`` without z; for a large matrix ``sum |w| |z|``
    is close to ``sqrt(2 / pi) * sum |w|``, so the two nearly agree up to a constant).

    The block's score: per-matrix, the sum over its tensors of the mean over batches (`loss_fn` a list)
    and `n_directions` directions; block mode, that mean for the whole block. (The released code sums
    over batches instead of averaging: the same for every block, so the same allocation.)

    `loss_fn()` takes no argument and returns the scalar loss; it runs under ``torch.no_grad``. Put the
    model in eval mode first. z is drawn from ``torch.Generator`` seeds derived from `seed` (the same
    seed gives the same scores) and regenerated rather than stored; the perturbed tensors' weights are
    copied before and written back after every direction, so they come back bit-exactly (also when
    loss_fn raises; the released code subtracts the perturbation again). Weights are perturbed in their
    own dtype: with half precision, use an `eps` large enough to survive rounding (e.g. 1e-2). Cost:
    ``2 * batches * n_directions`` forwards per tensor (per-matrix) or per block (block).
    `around_block(k)`, if given, is a context manager entered while block k is scored (blocks in
    order; every tensor of block k is scored inside it), e.g. `suffix.SuffixLosses.skipping`, which
    replays the unperturbed blocks before it.
    """
    groups, fns = _block_params(blocks), _loss_fns(loss_fn)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
        raise VlmpruneError(f"eps={eps!r} must be a finite number > 0 (the perturbation size, e.g. 1e-3)")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise VlmpruneError(f"n_directions={n_directions!r} must be a positive int (random directions per perturbed tensor, or block, and batch)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VlmpruneError(f"seed={seed!r} must be an int")
    if mode not in ZEROTH_MODES:
        raise VlmpruneError(f"mode={mode!r} is not one of {', '.join(ZEROTH_MODES)} (per-matrix: each weight matrix perturbed alone, as ECoFLaP's code; block: the whole block at once)")
    weighted = score_kind(score) == "grad-weight"
    master = torch.Generator().manual_seed(seed)
    scores = []
    for k, params in enumerate(groups):
        parts = [[p] for p in params] if mode == "per-matrix" else [params]  # what one direction perturbs
        with around_block(k) if around_block is not None else nullcontext():
            scores.append(sum(_part_score(fns, part, master, eps, n_directions, weighted) for part in parts))
    return scores


def _part_score(fns: list[LossFn], params: list[torch.Tensor], master: torch.Generator, eps: float, n_directions: int, weighted: bool) -> float:
    """Mean over batches and directions of one direction's score, perturbing `params` together."""
    originals = [p.detach().clone() for p in params]
    total = 0.0
    try:
        for fn in fns:
            for _ in range(n_directions):
                z_seed = int(torch.randint(2**62, (1,), generator=master))
                total += _direction_score(fn, params, originals, z_seed, eps, weighted)
    finally:
        _write(params, originals)
    return total / (len(fns) * n_directions)


def direction_noise(params: list[torch.Tensor], seed: int):
    """z for each tensor perturbed together, regenerated identically from `seed` (tensor i from ``seed + i``)."""
    for i, p in enumerate(params):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        yield torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))


def _direction_score(fn: LossFn, params, originals, seed: int, eps: float, weighted: bool) -> float:
    """``|g| * sum |w| |z|`` (or ``|g|``) for the direction z drawn from `seed`; leaves the weights perturbed."""
    losses, spread = [], 0.0
    for sign in (1, -1):
        with torch.no_grad():
            for p, w, z in zip(params, originals, direction_noise(params, seed)):
                p.copy_(w + sign * eps * z)
                if sign == 1 and weighted:
                    spread += (w.double().abs() * z.double().abs()).sum().item()
            losses.append(_scalar(fn()).item())
    g = (losses[0] - losses[1]) / (2 * eps)  # projected gradient: dL/dz at w
    return abs(g) * spread if weighted else abs(g)


def _write(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
