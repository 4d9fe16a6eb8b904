"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv:2410.17247)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ..base import check_keep, last_token_attention, top_visual
from ..registry import register_method


@register_method("pdrop")
@dataclass(frozen=True)
class PDrop:
    """The decoder is split into stages at fractions `stages` of its depth; at each stage boundary the
    visual tokens are ranked by the last instruction token's attention in the layer before it and a
    share `ratio` (lambda) of the present ones is kept. Without `ratio`, lambda is chosen so that the
    final share equals `keep` (lambda = keep ** (1 / n_stages)).

        pm(**inputs, prune=vlmprune.PDrop(keep=0.125))  # lambda = 0.5 over three stages
    """

    keep: float = 0.125
    stages: tuple[float, ...] = (0.25, 0.5, 0.75)
    ratio: float | None = None

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if not isinstance(self.keep, float):
            raise VlmpruneError("PDrop's keep is the final share of visual tokens: a ratio in (0, 1]")
        if not self.stages or any(not 0 < f < 1 for f in self.stages) or list(self.stages) != sorted(set(self.stages)):
            raise VlmpruneError(f"PDrop stages must be increasing fractions of depth in (0, 1), got {self.stages}")
        if self.ratio is not None:
            check_keep(float(self.ratio), "ratio")

    @property
    def lam(self) -> float:
        return self.ratio if self.ratio is not None else self.keep ** (1 / len(self.stages))

    def stage_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in self.stages})
        return tuple(layers)

    def decide(self, pm, prep):
        return Plan(), [_Stages(self.stage_layers(pm.n_layers), self.lam)]


@dataclass(frozen=True)
class _Stages:
    layers: tuple[int, ...]
    lam: float

    def select(self, layer, view):
        return top_visual(view, last_token_attention(view), float(self.lam))
