"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv:2410.17247)."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.plan import Plan
from ..base import Schedule, check_keep, check_stages, keep_count, last_token_attention, opt, stage_layers, top_visual
from ..registry import register_method


@register_method("pdrop", kind="inside", budget="keep")
@dataclass(frozen=True)
class PDrop:
    """The decoder is split into stages at fractions `stages` of its depth; at each stage boundary the
    visual tokens are ranked by the last instruction token's attention in the layer before it and a
    share `ratio` (lambda) of the present ones is kept. Without `ratio`, lambda is chosen so that the
    final share equals `keep`: lambda = keep ** (1 / n_stages), n_stages counting the distinct layers
    the stages land on in this model (`stage_layers`: fractions that round to one layer are one stage).

        pm(**inputs, prune=vlmprune.PDrop(keep=0.125))  # lambda = 0.5 over three stages (4+ layers)
    """

    keep: float = opt(0.125, "the final share of visual tokens, in (0, 1], after the last stage")
    stages: tuple[float, ...] = opt(
        (0.25, 0.5, 0.75), "increasing fractions of the depth in (0, 1) where a stage boundary drops tokens"
    )
    ratio: float | None = opt(None, "lambda: the share of the present visual tokens each stage keeps (None: keep ** (1 / stages))")

    def __post_init__(self) -> None:
        check_stages("PDrop", self.keep, self.stages)
        if self.ratio is not None:
            check_keep(float(self.ratio), "ratio")

    def stage_ratio(self, n_layers: int) -> float:
        """lambda on a model of `n_layers`: `ratio`, else keep ** (1 / the number of distinct stage layers)."""
        if self.ratio is not None:
            return self.ratio
        return self.keep ** (1 / len(stage_layers(self.stages, n_layers)))

    def decide(self, pm, prep):
        return Plan(), [_Stages(stage_layers(self.stages, pm.n_layers), self.stage_ratio(pm.n_layers))]

    def schedule(self, sample, n_layers: int) -> Schedule:
        """At each stage a share lambda of the present tokens; one query row scored in the layer before."""
        keep, present, lam = {}, sample.n_visual, float(self.stage_ratio(n_layers))
        for layer in stage_layers(self.stages, n_layers):
            keep[layer] = present = keep_count(lam, present)
        return Schedule(keep=keep, score_rows={layer - 1: 1 for layer in keep})


@dataclass(frozen=True)
class _Stages:
    layers: tuple[int, ...]
    lam: float

    def select(self, layer, view):
        return top_visual(view, last_token_attention(view), float(self.lam))
