"""Random visual-token dropping: the floor every informed method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count
from ..registry import register_method


@register_method("random")
@dataclass(frozen=True)
class Random:
    """Keep a uniformly random `keep` (ratio or count) of each sample's visual tokens from `layer` on
    (0 = before the LLM). Reproducible: the same `seed` gives the same choice for the same input."""

    keep: float | int = 0.25
    layer: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        gen = torch.Generator().manual_seed(self.seed)
        rows = [torch.randperm(n, generator=gen)[: keep_count(self.keep, n)] for n in prep.n_visual]
        return Plan(keep={self.layer: rows}), []
