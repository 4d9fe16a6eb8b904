"""Stratified random visual-token dropping: `random`, spread over the image like PAR's router.

The tile-balanced rule of `methods/tiles.py` with uniform random scores in place of a router's: the
grid is cut into about k tiles and one random token of every tile is kept before a second of any (above
half the tokens, one random token of every tile is dropped before a second of any). It separates what
a learned router gains from *where* it looks from what it gains by merely covering the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count, opt, sample_generator
from ..registry import register_method
from ..tiles import balanced_scores


@register_method("stratified-random", kind="before", budget="keep")
@dataclass(frozen=True)
class StratifiedRandom:
    """Keep a random `keep` (ratio or count) of each sample's visual tokens from `layer` on (0 = before
    the LLM), tile-balanced: one random token of every tile before a second of any (`tiles.balanced_row`).

    Reproducible and batch-independent: sample b draws its uniform scores from ``base.sample_generator``
    (seeded from `seed` and a fingerprint of that sample alone), so the same sample gets the same tokens
    alone or in any padded batch, and a different `seed` gives a different choice."""

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")
    seed: int = opt(0, "seed of the random draws (each sample's draws also depend on the sample alone)")

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def logits(self, prep) -> torch.Tensor:
        """``[B, max n_visual]`` each sample's uniform random scores (zeros past its visual count)."""
        counts = prep.n_visual
        out = torch.zeros(len(counts), max(counts, default=0))
        for b, n in enumerate(counts):
            out[b, :n] = torch.rand(n, generator=sample_generator(self.seed, prep, b))
        return out

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        k = [keep_count(self.keep, n) if n else 0 for n in counts]
        scores = balanced_scores(self.logits(prep), counts, prep.visual_grids, torch.tensor(k))
        rows = [row[:n].topk(kb).indices.sort().values for row, n, kb in zip(scores, counts, k)]
        return Plan(keep={self.layer: rows}), []
