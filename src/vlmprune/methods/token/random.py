"""Random visual-token dropping: the floor every informed method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count, opt, sample_generator
from ..registry import register_method


@register_method("random", kind="before", budget="keep")
@dataclass(frozen=True)
class Random:
    """Keep a uniformly random `keep` (ratio or count) of each sample's visual tokens from `layer` on
    (0 = before the LLM). Reproducible and batch-independent: sample b draws from
    ``base.sample_generator`` (seeded from `seed` and a fingerprint of that sample alone, as
    `stratified-random` does), so the same sample gets the same tokens alone or at any position of any
    padded batch, and different samples draw independently."""

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")
    seed: int = opt(0, "seed of the random draws (each sample's draws also depend on the sample alone)")

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        rows = [torch.randperm(n, generator=sample_generator(self.seed, prep, b))[: keep_count(self.keep, n)]
                for b, n in enumerate(prep.n_visual)]
        return Plan(keep={self.layer: rows}), []
