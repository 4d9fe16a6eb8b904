"""Random layer removal: the floor for layer methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep_layers, opt, skip_all_but
from ..registry import register_method


@register_method("random-layers", kind="layers", budget="keep_layers")
@dataclass(frozen=True)
class RandomLayers:
    """Keep `keep_layers` decoder layers chosen uniformly at random (seeded); skip the others."""

    keep_layers: float | int = opt(0.75, "decoder layers kept: a share in (0, 1] or a count")
    seed: int = opt(0, "seed of the random draws (each sample's draws also depend on the sample alone)")

    def __post_init__(self) -> None:
        check_keep_layers(self.keep_layers)

    def decide(self, pm, prep):
        order = torch.randperm(pm.n_layers, generator=torch.Generator().manual_seed(self.seed))
        return Plan(skip=skip_all_but(order, self.keep_layers, pm.n_layers)), []
