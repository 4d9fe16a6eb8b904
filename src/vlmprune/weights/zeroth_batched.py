"""ECoFLaP's zeroth-order scores with many directions in one forward.

The same estimator as `allocation.zeroth_order_scores` (same directions: z from the same seeds, drawn
in the same order; same central difference, same scores), computed with fewer, larger forwards. The
sequential path runs two batch-1 forwards per direction (``w + eps z``, then ``w - eps z``). Here the
scored pieces of one group (equal input shapes) are stacked, each piece once per direction and sign,
and every perturbed linear adds its own row's perturbation to the dense output::

    y_r = x_r W^T + b + sign_r * eps * x_r z_r^T        # = x_r (W + sign_r eps z_r)^T + b

so one forward gives every direction of the group both of its losses, each half's loss its own
(`samples.loss_sums`: per row, the summed cross-entropy and the labelled tokens, so a half's loss is
the token mean of the piece alone, as `samples.calibration_loss`). The
dense weights are never written. Rows are direction-major: with pieces of r rows, direction d of a
group owns rows ``2dr .. 2dr + r - 1`` (+) and the next r (-). A linear whose input does not lead with a multiple of the group's rows (a
family that flattens its inputs across samples in another order) raises, naming ``zeroth_batch=1``.

The scores equal the sequential path's up to float rounding (the tests compare them): the sum
``x W^T + eps x z^T`` rounds differently from ``x (W + eps z)^T``, and a stacked forward from a batch-1
one, by a few units in the last place of each loss, which the difference divides by ``2 eps``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VlmpruneError
from .allocation import direction_noise, score_kind


@dataclass(frozen=True)
class DirectionGroup:
    """Stacked inputs of `directions` directions, `rows` rows per piece: rows ``2d r .. 2(d + 1) r - 1``
    are direction d's piece, twice (+ then -)."""

    batch: dict
    directions: int
    rows: int


def _signature(batch: Mapping) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)))


def stack_directions(pieces: Sequence[Mapping], n_directions: int, max_directions: int) -> list[DirectionGroup]:
    """Consecutive pieces of equal input shapes, each repeated ``2 * n_directions`` times along dim 0,
    in groups of at most `max_directions` directions (at least one piece per group). Every input
    tensor is concatenated along dim 0, the batching convention of the supported families (per-sample
    rows, or flattened image patches with their grids)."""
    groups: list[list[Mapping]] = []
    for piece in pieces:
        if any(not isinstance(v, torch.Tensor) for v in piece.values()):
            raise VlmpruneError(f"a scored piece holds a non-tensor input ({', '.join(k for k, v in piece.items() if not isinstance(v, torch.Tensor))}); "
                                "use zeroth_batch=1")
        last = groups[-1] if groups else None
        if last and _signature(last[0]) == _signature(piece) and (len(last) + 1) * n_directions <= max_directions:
            last.append(piece)
        else:
            groups.append([piece])
    reps = 2 * n_directions
    out = []
    for group in groups:
        batch = {k: torch.cat([p[k] for p in group for _ in range(reps)]) for k in group[0]}
        out.append(DirectionGroup(batch, len(group) * n_directions, int(group[0]["input_ids"].shape[0])))
    return out


def batched_zeroth_order_scores(
    losses: Sequence[Callable[[], torch.Tensor]],
    groups: Sequence[DirectionGroup],
    blocks: Sequence[Sequence[nn.Linear]],
    eps: float = 1e-3,
    seed: int = 0,
    mode: str = "per-matrix",
    score: str = "grad",
    around_block: Callable[[int], AbstractContextManager] | None = None,
) -> list[float]:
    """Each block's zeroth-order importance, as `allocation.zeroth_order_scores` with the same `eps`,
    `seed`, `mode` and `score` on the pieces the groups stack (``n_directions`` per piece as stacked),
    with one forward per group and perturbed part. ``losses[i]()`` returns group i's per-row
    ``[loss sum, labelled tokens]`` (`samples.loss_sums`); `blocks` are each block's linears."""
    if len(losses) != len(groups):
        raise VlmpruneError(f"{len(losses)} loss functions for {len(groups)} direction groups; give one per group")
    weighted = score_kind(score) == "grad-weight"
    master = torch.Generator().manual_seed(seed)
    n_dirs = sum(g.directions for g in groups)
    scores = []
    for k, linears in enumerate(blocks):
        parts = [[m] for m in linears] if mode == "per-matrix" else [list(linears)]
        with around_block(k) if around_block is not None else nullcontext():
            total = 0.0
            for part in parts:
                seeds = [int(torch.randint(2**62, (1,), generator=master)) for _ in range(n_dirs)]  # the sequential order
                total += _part_total(losses, groups, part, seeds, eps, weighted) / n_dirs
            scores.append(total)
    return scores


def _part_total(losses, groups, part: list[nn.Linear], seeds: list[int], eps: float, weighted: bool) -> float:
    """Sum over all directions of |g| (or |g| * sum |w||z|) with `part`'s linears perturbed together."""
    total, start = 0.0, 0
    for fn, group in zip(losses, groups):
        chunk = seeds[start : start + group.directions]
        start += group.directions
        noise = [list(direction_noise([m.weight for m in part], s)) for s in chunk]  # noise[d][i]: z of linear i
        zs = [torch.stack([noise[d][i] for d in range(len(chunk))]) for i in range(len(part))]
        with torch.no_grad(), _perturbed(part, zs, eps):
            sums = torch.as_tensor(fn()).double()
        if sums.shape != (2 * group.directions * group.rows, 2):
            raise VlmpruneError(f"the loss returned shape {tuple(sums.shape)} for {2 * group.directions * group.rows} stacked rows; "
                                "return [loss sum, labelled tokens] per row (samples.loss_sums)")
        halves = sums.view(2 * group.directions, group.rows, 2).sum(1)
        loss = halves[:, 0] / halves[:, 1]  # each half's token mean
        g = (loss[0::2] - loss[1::2]) / (2 * eps)  # each direction's projected gradient
        if weighted:
            with torch.no_grad():
                spread = torch.stack([sum((m.weight.double().abs() * z[d].double().abs()).sum() for m, z in zip(part, zs))
                                      for d in range(len(chunk))])
            total += float((g.abs() * spread).sum())
        else:
            total += float(g.abs().sum())
    return total


@contextmanager
def _perturbed(linears: list[nn.Linear], zs: list[torch.Tensor], eps: float):
    """Inside, linear i adds ``+- eps x z_i[d]^T`` to the rows of direction d (see the module doc)."""
    for m, z in zip(linears, zs):
        m.forward = functools.partial(_perturbed_forward, m, z, eps)
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


def _perturbed_forward(linear: nn.Linear, z: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor:
    y = nn.functional.linear(x, linear.weight, linear.bias)
    directions, rows = z.shape[0], 2 * z.shape[0]
    if x.dim() < 2 or x.shape[0] % rows:
        raise VlmpruneError(
            f"{type(linear).__name__} input of shape {tuple(x.shape)} does not lead with a multiple of the {rows} stacked rows, "
            "so the batched zeroth-order scores cannot tell its rows apart; use zeroth_batch=1 (one forward per direction)"
        )
    xs = x.reshape(directions, -1, x.shape[-1])  # direction d's + rows, then its - rows
    delta = torch.bmm(xs, z.to(x.dtype).transpose(1, 2)).view(directions, 2, -1, y.shape[-1])
    delta = delta * torch.tensor([eps, -eps], dtype=y.dtype, device=y.device).view(1, 2, 1, 1)
    return y + delta.reshape(y.shape)
