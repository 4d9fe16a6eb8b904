"""Local pruners: which weights of one linear layer to zero, given its calibration statistics.

Every pruner is a pure function of a weight ``[out_features, in_features]`` (plus statistics) and a
sparsity pattern, and returns a **keep mask**: a bool tensor of the weight's shape, True where the
weight stays, False where it is zeroed. Patterns (see `Pattern`):

* unstructured, ``sparsity=s`` in [0, 1): zero ``floor(s * n)`` weights, where n is a row's length
  (``per="row"``) or the whole matrix (``per="matrix"``);
* N:M, ``nm="2:4"``: in every group of M consecutive input columns of each output row, **keep N** and
  zero the other M - N (2:4 and 4:8 zero exactly half, the pattern sparse tensor cores accelerate).

Scores (the lowest are pruned; ties go to the lower index, row-major, by a stable sort):

* `magnitude_mask`: ``|W_ij|``;
* `wanda_mask`: ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for
  Large Language Models", https://arxiv.org/abs/2306.11695);
* `sparsegpt_prune`: ``W_ij^2 / [U]_jj^2`` with U the upper Cholesky factor of H^-1, and it also
  updates the surviving weights to compensate (Frantar & Alistarh 2023, "SparseGPT: Massive Language
  Models Can Be Accurately Pruned in One-Shot", https://arxiv.org/abs/2301.00774).

Each is registered by name (`registry.register_pruner`) with the one signature of a local pruner,
``prune(weight, stats, pattern, cfg) -> Pruned`` (bottom of this file): ``"magnitude"`` (per matrix),
``"wanda"`` (needs ``"norm"``, per row) and ``"sparsegpt"`` (needs ``"hessian"``).

`InputStats` gathers what Wanda and SparseGPT need from a layer's inputs::

    stats = InputStats(linear.in_features, hessian=True)
    handle = linear.register_forward_pre_hook(stats.hook)
    ...  # run calibration batches
    handle.remove()
    weight, keep = sparsegpt_prune(linear.weight, stats.hessian, nm="2:4")
    apply_mask(linear, wanda_mask(linear.weight, stats.norm, sparsity=0.5))  # or Wanda
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VlmpruneError
from .registry import Pruned, register_pruner

PER = ("row", "matrix")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4" -> (2, 4)``: keep N of every M; checks ``0 < N < M``."""
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text) if isinstance(text, str) else None
    if found is None:
        raise VlmpruneError(f"an N:M pattern looks like '2:4' (keep N of every M weights), got {text!r}")
    return check_nm(int(found[1]), int(found[2]))


def check_nm(n: int, m: int) -> tuple[int, int]:
    if not 0 < n < m:
        raise VlmpruneError(f"N:M pattern {n}:{m} keeps N of every M weights, so it needs 0 < N < M (e.g. 2:4 or 4:8)")
    return n, m


def prune_count(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)``, forgiving float round-off (0.29 of 100 is 29, not 28)."""
    x = sparsity * n
    return round(x) if abs(x - round(x)) < 1e-6 else math.floor(x)


@dataclass(frozen=True)
class Pattern:
    """What a pruner zeroes: unstructured at ``sparsity`` in [0, 1), or ``nm`` (``"2:4"`` or ``(2, 4)``,
    keep N of every M consecutive input columns of each row). Exactly one of the two is given: an N:M
    pattern fixes the sparsity at 1 - N/M."""

    sparsity: float | None = None
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.nm is None):
            raise VlmpruneError("give either sparsity (unstructured, in [0, 1)) or nm (e.g. '2:4'), exactly one of them")
        if self.nm is not None:
            object.__setattr__(self, "nm", parse_nm(self.nm) if isinstance(self.nm, str) else _nm_pair(self.nm))
            return
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise VlmpruneError(f"sparsity={s!r} is outside [0, 1); give the share of weights to zero, e.g. 0.5")

    @property
    def ratio(self) -> float:
        """The share of weights zeroed."""
        return 1 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

    def check(self, weight: torch.Tensor) -> None:
        """The weight is ``[out_features, in_features]`` and, for N:M, M divides in_features."""
        if weight.dim() != 2:
            raise VlmpruneError(f"a local pruner takes a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
        if self.nm and weight.shape[1] % self.nm[1]:
            n, m = self.nm
            raise VlmpruneError(
                f"in_features={weight.shape[1]} is not divisible by M={m} of the {n}:{m} pattern; "
                f"use an M that divides it, or unstructured sparsity"
            )


def _nm_pair(nm) -> tuple[int, int]:
    if not (isinstance(nm, (tuple, list)) and len(nm) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)):
        raise VlmpruneError(f"nm must be a string like '2:4' or a pair of ints (2, 4), got {nm!r}")
    return check_nm(*nm)


def prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask over the last dim: False at the `k` lowest scores of each row (stable: ties prune the
    lower index first), what a stable sort's first `k` give, found by selection rather than sorting:
    each row's k-th lowest value t, every score below t, and the first ``k - #below`` scores equal to
    t (about twice as fast as the sort on a CPU). A row holding NaN falls back to the sort (NaN last)."""
    n = scores.shape[-1]
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        lowest = scores.sort(dim=-1, stable=True).indices[..., :k]
        return torch.ones_like(scores, dtype=torch.bool).scatter_(-1, lowest, False)
    t = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < t
    ties = scores == t
    take = ties & (ties.cumsum(-1) <= k - below.sum(-1, keepdim=True))  # the lowest-index ties fill up to k
    return ~(below | take)


def select_keep(scores: torch.Tensor, pattern: Pattern, per: str = "row") -> torch.Tensor:
    """Keep mask ``[out, in]`` pruning the lowest `scores` under `pattern`; `per` ("row" / "matrix")
    is where unstructured sparsity is counted (N:M is always per group of each row)."""
    if per not in PER:
        raise VlmpruneError(f"per={per!r}: choose 'row' (compare within each output row) or 'matrix' (across the matrix)")
    pattern.check(scores)
    rows, cols = scores.shape
    if pattern.nm:
        n, m = pattern.nm
        return prune_lowest(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)
    if per == "row":
        return prune_lowest(scores, prune_count(pattern.sparsity, cols))
    return prune_lowest(scores.reshape(1, -1), prune_count(pattern.sparsity, scores.numel())).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, nm=None, per: str = "matrix") -> torch.Tensor:
    """Keep mask by ``|W|``; unstructured sparsity is counted across the matrix by default (the usual
    layer-wise magnitude baseline)."""
    return select_keep(weight.detach().float().abs(), Pattern(sparsity, nm), per)


def wanda_mask(
    weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float | None = None, nm=None, per: str = "row"
) -> torch.Tensor:
    """Keep mask by ``|W_ij| * ||X_j||_2``; `input_norm` ``[in_features]`` is each input column's L2
    norm over the calibration inputs (`InputStats.norm`). Wanda counts sparsity per output row."""
    pattern = Pattern(sparsity, nm)
    pattern.check(weight)
    if input_norm.shape != (weight.shape[1],):
        raise VlmpruneError(
            f"input_norm has shape {tuple(input_norm.shape)}, but the weight has in_features={weight.shape[1]}; "
            "give one L2 norm per input column (InputStats.norm of this layer's inputs)"
        )
    scores = weight.detach().float().abs() * input_norm.to(weight.device, torch.float32)[None, :]
    return select_keep(scores, pattern, per)


class InputStats:
    """Running statistics of one linear layer's inputs ``x [..., in_features]``, fed chunk by chunk with
    `add` (or as a forward pre-hook: ``linear.register_forward_pre_hook(stats.hook)``).

    A sample is one row of the flattened input (one token). `norm` is each input column's L2 norm
    over all samples (Wanda); with ``hessian=True``, `hessian` is ``H = 2/n * sum_x x x^T``, the Hessian
    of the layer's reconstruction error ``||W X - W' X||^2`` (SparseGPT), accumulated in `dtype`."""

    def __init__(self, in_features: int, hessian: bool = False, dtype: torch.dtype = torch.float32, device=None):
        self.in_features = in_features
        self.n = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)  # (in,)
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        self.accumulate(self.moments(x))

    def moments(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """What `add` adds for inputs ``x``: (samples, column sums of squares, ``X^T X`` or None); linears
        fed the same tensor (q / k / v, gate / up) can share one computation (`accumulate` each)."""
        if x.shape[-1] != self.in_features:
            raise VlmpruneError(f"inputs have {x.shape[-1]} features, but these stats are for in_features={self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self.sq_sum.device)  # (samples, in)
        xd = None if self.xtx is None else x.to(self.xtx.dtype)
        return x.shape[0], x.float().square().sum(0).double(), None if xd is None else xd.T @ xd

    def accumulate(self, moments: tuple[int, torch.Tensor, torch.Tensor | None]) -> None:
        n, sq_sum, xtx = moments
        self.n += n
        self.sq_sum += sq_sum
        if self.xtx is not None:
            self.xtx += xtx

    def hook(self, module: nn.Module, args: tuple) -> None:
        """A forward pre-hook: records the module's input."""
        self.add(args[0])

    @property
    def norm(self) -> torch.Tensor:
        """``[in_features]`` float32: ``||X_j||_2`` over every sample added."""
        return self.sq_sum.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        """``[in_features, in_features]``: ``2/n * X^T X``."""
        if self.xtx is None:
            raise VlmpruneError("these InputStats do not collect the Hessian; build them with InputStats(..., hessian=True)")
        if self.n == 0:
            raise VlmpruneError("no calibration inputs were recorded for this layer; run calibration batches through it first")
        return self.xtx * (2 / self.n)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    nm=None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune columns left to right and update the
    later columns so that ``W X`` changes least on the calibration inputs (the OBS update).

    `hessian` is ``[in, in]`` (`InputStats.hessian`). It is dampened by ``damp * mean(diag H)``; inputs
    that were zero in every sample (``H_jj = 0``) get ``H_jj = 1`` and their weights are set to zero (they
    never affect the calibration outputs, so they are pruned first, as in the reference code). Columns
    are handled in blocks of `block_size`. Mask selection by ``w^2 / U_jj^2`` (U: upper Cholesky factor
    of H^-1), on the weights as updated so far:

    * unstructured: at the start of each block, the lowest ``floor(sparsity * out * block_cols)`` scores
      of the whole block (all rows) are pruned, so each block has exactly that many zeros in the mask
      (the whole matrix has exactly ``sparsity * numel`` when each block's count is a whole number);
    * N:M: per group of M columns of each row, when the group is reached, the M - N lowest are pruned
      (`block_size` must be a multiple of M).

    Returns ``(new_weight, keep)``: the updated weight in the input's dtype, zero wherever ``keep`` is
    False, and the bool keep mask. Computes in float32 (float64 if either input is float64).
    """
    pattern = Pattern(sparsity, nm)
    pattern.check(weight)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise VlmpruneError(f"hessian has shape {tuple(hessian.shape)}; a weight with in_features={cols} needs [{cols}, {cols}]")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (pattern.nm and block_size % pattern.nm[1]):
        raise VlmpruneError(f"block_size={block_size!r} must be a positive int (a multiple of M for N:M patterns)")
    if not damp >= 0:
        raise VlmpruneError(f"damp={damp!r} must be >= 0 (a share of the mean Hessian diagonal, e.g. 0.01)")

    dtype = torch.promote_types(torch.promote_types(weight.dtype, hessian.dtype), torch.float32)
    W = weight.detach().to(dtype).clone()  # (out, in)
    H = hessian.detach().to(W.device, dtype).clone()  # (in, in)
    dead = H.diagonal() == 0
    W[:, dead] = 0
    U = _inverse_hessian_factor(H, dead, damp)  # (in, in), upper triangular
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        err = _prune_block(W[:, i1:i2], U[i1:i2, i1:i2], keep[:, i1:i2], pattern)
        W[:, i2:] -= err @ U[i1:i2, i2:]  # the block's updates to every later column, in one matmul
    return W.to(weight.dtype), keep


def _inverse_hessian_factor(H: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of the dampened H^-1 (``H^-1 = U^T U``); modifies H."""
    if dead.all():
        raise VlmpruneError("the Hessian is zero: no calibration input reached this layer; check the calibration data")
    diag = H.diagonal()  # a view: edits H
    diag[dead] = 1
    diag += damp * diag.mean()
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info != 0 or not torch.isfinite(U).all():
        raise VlmpruneError(
            f"the Hessian is not positive definite after damping (damp={damp}); "
            "use more calibration samples or a larger damp (e.g. 0.1)"
        )
    return U


def _prune_block(W: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the block ``W [out, count]`` in place, column by column, writing ``keep [out, count]``;
    ``U [count, count]`` is the factor's diagonal block. Returns the scaled errors ``[out, count]``
    that update the later columns."""
    err = torch.zeros_like(W)
    scale = U.diagonal() ** 2  # (count,)  U_jj^2 = [(H[j:, j:])^-1]_00: column j's OBS denominator
    if not pattern.nm:
        chosen = prune_lowest((W**2 / scale).reshape(1, -1), prune_count(pattern.sparsity, W.numel()))
        keep.copy_(chosen.reshape(keep.shape))
    for i in range(W.shape[1]):
        if pattern.nm and i % pattern.nm[1] == 0:
            n, m = pattern.nm
            keep[:, i : i + m] = prune_lowest(W[:, i : i + m] ** 2 / scale[i : i + m], m - n)
        q = W[:, i] * keep[:, i]
        err[:, i] = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, i, None] * U[i, i:][None, :]  # OBS with F = H[i:, i:]: -(w - q) / [F^-1]_00 * [F^-1]_0,:
        W[:, i] = q  # exact zeros (the update above leaves q up to round-off)
    return err


def apply_mask(target: nn.Module | torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the weights `mask` does not keep; `target` is a layer with ``.weight`` (e.g.
    nn.Linear) or a weight tensor. Returns the weight."""
    weight = target.weight if isinstance(target, nn.Module) else target
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise VlmpruneError(f"the mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    with torch.no_grad():
        weight.masked_fill_(~mask.to(weight.device), 0)
    return weight


# ----------------------------------------------------------------------------- the registered pruners


def masked(weight: torch.Tensor, keep: torch.Tensor) -> Pruned:
    """`Pruned` for a pruner that only selects: the weight zeroed where `keep` is False."""
    return Pruned(weight.detach().masked_fill(~keep.to(weight.device), 0), keep)


@register_pruner("wanda", needs=("norm",))
def wanda(weight: torch.Tensor, stats, pattern: Pattern, cfg) -> Pruned:
    """Wanda: ``|W_ij| * ||X_j||_2``, counted per output row."""
    return masked(weight, wanda_mask(weight, stats["norm"], sparsity=pattern.sparsity, nm=pattern.nm))


@register_pruner("sparsegpt", needs=("hessian",))
def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, cfg) -> Pruned:
    """SparseGPT: OBS pruning with weight updates on the layer's Hessian."""
    return Pruned(*sparsegpt_prune(weight, stats["hessian"], sparsity=pattern.sparsity, nm=pattern.nm))


@register_pruner("magnitude")
def magnitude(weight: torch.Tensor, stats, pattern: Pattern, cfg) -> Pruned:
    """``|W_ij|``, counted across the matrix."""
    return masked(weight, magnitude_mask(weight, sparsity=pattern.sparsity, nm=pattern.nm))
