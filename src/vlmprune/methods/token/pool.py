"""2-D average pooling of the visual grid: a structure-only baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count, opt
from ..registry import register_method


def pooled_groups(rows: int, cols: int, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition a ``rows x cols`` grid (row-major indices) into about `target` rectangular blocks.

    Returns (assign, keep): each token's representative (its block's centre token) and the sorted
    representatives. Block boundaries are ``floor(i * rows / gh)`` as in adaptive average pooling,
    which they equal when the sizes divide.
    """
    scale = (rows * cols / target) ** 0.5
    gh, gw = max(1, min(rows, round(rows / scale))), max(1, min(cols, round(cols / scale)))
    r_edges = [i * rows // gh for i in range(gh + 1)]
    c_edges = [j * cols // gw for j in range(gw + 1)]
    assign = torch.empty(rows * cols, dtype=torch.long)
    for i in range(gh):
        for j in range(gw):
            r0, r1, c0, c1 = r_edges[i], r_edges[i + 1], c_edges[j], c_edges[j + 1]
            centre = ((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2
            block = (torch.arange(r0, r1)[:, None] * cols + torch.arange(c0, c1)[None, :]).reshape(-1)
            assign[block] = centre
    return assign, torch.unique(assign)


@register_method("pool", kind="before", budget="keep")
@dataclass(frozen=True)
class Pool:
    """Average-pool each sample's visual grid to about `keep` tokens (ratio or count) at `layer`
    (0 = before the LLM); each pooled token sits at its block's centre position. Inputs whose visual
    tokens are not one grid (LLaVA-NeXT tiles, several images) are pooled in 1-D runs of the sequence.
    The achieved count is in the run's stats."""

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        grids = prep.visual_grids or [None] * len(prep.n_visual)
        assigns, keeps = [], []
        for n, grid in zip(prep.n_visual, grids):
            rows, cols = grid if grid is not None else (1, n)
            assign, keep = pooled_groups(rows, cols, keep_count(self.keep, n))
            assigns.append(assign)
            keeps.append(keep)
        return Plan(keep={self.layer: keeps}, merge={self.layer: assigns}), []
