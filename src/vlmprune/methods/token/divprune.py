"""DivPrune (Alvar et al., 2025, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv:2503.02175): keep the most diverse subset of the visual tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count, opt
from ..registry import register_method

RELEASED_KEEP = 0.098  # the released default SUBSET_RATIO (run_Divprune.sh:11, README.md:33)
TIE = 1e-12  # scores this close are equal: identical tokens (LLaVA-NeXT's newlines) differ only by float64 rounding


def first_max(scores: torch.Tensor) -> int:
    """The lowest index whose score is within `TIE` of the maximum."""
    return int((scores >= scores.max() - TIE).nonzero()[0])


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy max-min diverse subset of ``k`` of the ``n`` rows of ``features [n, d]``.

    Distance: cosine distance ``1 - cos(x_i, x_j)`` (float64). The first token is the one whose nearest
    other token is farthest; each next one is the token, not chosen yet, whose distance to the chosen
    set (its minimum distance to a chosen token) is largest. Ties (within `TIE`, so that identical
    tokens tie whatever the rounding of the product): the lower index. Returns the sorted chosen indices.
    """
    n = features.shape[0]
    unit = F.normalize(features.double(), dim=-1)  # (n, d)
    distance = 1 - unit @ unit.T  # (n, n) cosine distance
    others = distance.clone().fill_diagonal_(float("inf"))
    to_chosen = others.min(1).values  # (n,) first pick: each token's distance to its nearest other token
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    for i in range(k):
        j = first_max(to_chosen.masked_fill(chosen, float("-inf")))
        chosen[j] = True
        to_chosen = distance[j].clone() if i == 0 else torch.minimum(to_chosen, distance[j])
    return chosen.nonzero().squeeze(1)


@register_method("divprune", kind="before", budget="keep")
@dataclass(frozen=True)
class DivPrune:
    """Keep the `keep` visual tokens (ratio or count of each sample's visual tokens) that form the most
    diverse subset of its projected visual embeddings (the LLM's input embeddings at the image
    placeholders): greedy max-min of cosine distance (`divprune_select`). The plan acts at decoder
    layer `layer` (0 = the LLM's input, as the paper).

        pm(**inputs, prune=vlmprune.methods.DivPrune(keep=0.098))   # the released default ratio

    As released (github:vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``): features are the visual
    rows of the LLM's input embeddings, after the projector (``:374``); distance ``1 - cos`` over
    L2-normalised rows (``:147-150, 155``); ``round(ratio * n)`` tokens (``:153``; at least 1 here); the first pick
    maximises each token's second-smallest distance in its column, i.e. to its nearest other token
    (``:165``), each next pick maximises the minimum distance to the picked ones (``:167-169``); kept
    tokens in sequence order (``:378-380``); pruning at layer 0 (``:365``).

    Deviations: picked tokens are excluded from later picks (the released argmax could pick one again
    once every remaining distance is 0, e.g. LLaVA-NeXT's identical image-newline tokens); the first
    pick's nearest-other distance leaves the token itself out explicitly (the released second-smallest
    value equals it unless rounding puts another distance below the self-distance); distances in
    float64; every visual token of a sample (several images, LLaVA-NeXT's tiles and newline tokens)
    is one pool, and padded batches work (the released code takes one image span at a fixed offset).

    Pricing: the distance matrix, ``n^2 x hidden`` multiply-adds per sample, counts as the method's
    scoring (``Plan.overhead``); the greedy minima are not counted (no products).
    """

    keep: float | int = opt(RELEASED_KEEP, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        if not sum(counts):
            return Plan(), []
        visual = prep.visual_mask & prep.attention_mask.bool()
        rows, overhead = [], []
        for b, n in enumerate(counts):
            features = prep.inputs_embeds[b][visual[b]].detach()  # (n, D) projected visual tokens, in sequence order
            rows.append(divprune_select(features, keep_count(self.keep, n)).cpu() if n else torch.zeros(0, dtype=torch.long))
            overhead.append(float(n * n * features.shape[-1]))  # the (n, n) distance product
        return Plan(keep={self.layer: rows}, overhead=overhead), []
