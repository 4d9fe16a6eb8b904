"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ..base import Schedule, check_keep, check_layer, keep_count, last_token_attention, opt, top_visual
from ..registry import register_method


@register_method("fastv", kind="inside", budget="keep")
@dataclass(frozen=True)
class FastV:
    """At decoder layer `layer` (K), keep the `keep` visual tokens (ratio or count) that the last token
    attended to most in layer K-1, attention averaged over heads; the rest leave the sequence from K on.

        pm(**inputs, prune=vlmprune.FastV(layer=2, keep=0.25))
    """

    layer: int = opt(2, "K: at this decoder layer the visual tokens the last token attended to least (in layer K-1) leave")
    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.layer < 1:
            raise VlmpruneError("FastV ranks tokens by layer K-1's attention, so layer K must be >= 1")

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers, lowest=1)
        return Plan(), [self]

    def schedule(self, sample, n_layers: int) -> Schedule:
        """From layer K on, keep's count of the visual tokens; one query row scored in layer K-1."""
        check_layer(self.layer, n_layers, lowest=1)
        return Schedule(keep={self.layer: keep_count(self.keep, sample.n_visual)}, score_rows={self.layer - 1: 1})

    def select(self, layer, view):
        return top_visual(view, last_token_attention(view), self.keep)
