"""Random layer removal: the floor for layer methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ..registry import register_method


@register_method("random-layers")
@dataclass(frozen=True)
class RandomLayers:
    """Keep `keep_layers` decoder layers chosen uniformly at random (seeded); skip the others."""

    keep_layers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.keep_layers, bool) or not isinstance(self.keep_layers, int) or self.keep_layers < 1:
            raise VlmpruneError(f"keep_layers must be a layer count >= 1, got {self.keep_layers!r}")

    def decide(self, pm, prep):
        n = pm.n_layers
        if self.keep_layers > n:
            raise VlmpruneError(f"keep_layers={self.keep_layers} but the model has {n} decoder layers")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return Plan(skip=sorted(order[: n - self.keep_layers].tolist())), []
