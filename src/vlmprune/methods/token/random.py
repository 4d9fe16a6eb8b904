"""Random visual-token dropping: the floor every informed method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count, sample_generator
from ..registry import register_method


@register_method("random")
@dataclass(frozen=True)
class Random:
    """Keep a uniformly random `keep` (ratio or count) of each sample's visual tokens from `layer` on
    (0 = before the LLM). Reproducible and batch-independent: sample b draws from
    ``base.sample_generator`` (seeded from `seed` and a fingerprint of that sample alone, as
    `stratified-random` does), so the same sample gets the same tokens alone or at any position of any
    padded batch, and different samples draw independently."""

    keep: float | int = 0.25
    layer: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        rows = [torch.randperm(n, generator=sample_generator(self.seed, prep, b))[: keep_count(self.keep, n)]
                for b, n in enumerate(prep.n_visual)]
        return Plan(keep={self.layer: rows}), []
