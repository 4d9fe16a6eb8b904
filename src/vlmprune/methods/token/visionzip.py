"""VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", arXiv:2412.04467): dominant tokens by the vision tower's attention, plus contextual tokens
merged by key similarity, decided before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ..base import check_keep, check_layer, check_share, keep_count, opt
from ..registry import register_method

PAPER_DOMINANT_SHARE = 54 / 64  # the paper's 64-token setting: 54 dominant + 10 contextual (also 108+20, 162+30)


def visionzip_groups(
    dominance: torch.Tensor, keys: torch.Tensor, patch: torch.Tensor, budget: int, dominant_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's VisionZip decision over its ``n`` visual tokens.

    Args:
        dominance: ``[n]`` attention score per token (higher = more dominant).
        keys: ``[n, d]`` the tower layer's keys (mean over heads).
        patch: ``[n]`` bool, False for tokens with no vision-tower patch (never chosen, discarded).
        budget: tokens to keep (capped at the tokens with a patch).
        dominant_share: share of `budget` kept as dominant tokens, ``round(share * budget)``.

    Returns (keep, assign): the sorted kept indices and a merge row (README "merge"): dominant tokens
    and contextual targets map to themselves, every other token with a patch to its most similar
    target, tokens without a patch to -1.

    Dominant: the ``round(share * budget)`` tokens with the highest dominance (ties: lower index).
    Contextual: of the remaining ``r`` tokens in sequence order, every ``step``-th is a target
    (``step = max(1, r // c)``, the first ``c = budget - dominant`` of them); each other remaining token
    joins the target whose L2-normalised key has the largest dot product with its own (ties: the
    first target), and each target becomes the mean of its group.
    """
    n = dominance.numel()
    device = dominance.device
    assign = torch.full((n,), -1, dtype=torch.long, device=device)
    candidates = patch.nonzero().squeeze(1)
    budget = min(budget, candidates.numel())
    n_dominant = min(budget, round(dominant_share * budget))
    n_contextual = budget - n_dominant
    ranked = candidates[torch.argsort(dominance[candidates].float(), descending=True, stable=True)]
    dominant = ranked[:n_dominant]
    assign[dominant] = dominant
    rest = ranked[n_dominant:].sort().values  # the remaining tokens, in sequence order
    if n_contextual:
        step = max(1, rest.numel() // n_contextual)
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[torch.arange(0, rest.numel(), step, device=device)[:n_contextual]] = True
        targets, others = rest[is_target], rest[~is_target]
        unit = F.normalize(keys.float(), dim=-1)
        similarity = unit[others] @ unit[targets].T  # (others, targets) cosine of the keys
        assign[targets] = targets
        assign[others] = targets[similarity.argmax(1)]
    keep = torch.nonzero(assign == torch.arange(n, device=device)).squeeze(1)
    return keep, assign


@register_method("visionzip", kind="before", budget="keep")
@dataclass(frozen=True)
class VisionZip:
    """Keep `keep` visual tokens (ratio or count of each sample's visual tokens) chosen before the LLM:
    a `dominant_share` of them are the tokens the vision tower attends to most (LLaVA: the CLS token's
    attention in the layer ``vision_feature_layer`` selects; Qwen2-VL / Qwen2.5-VL: the mean attention a
    token receives in the last vision block), the rest are contextual tokens, each the mean of a group of
    the remaining tokens merged by key similarity (`visionzip_groups`). The plan acts at decoder layer
    `layer` (0 = the LLM's input).

        pm(**inputs, prune=vlmprune.VisionZip(keep=64))   # 54 dominant + 10 contextual, as the paper

    Differences from the released code: it merges the vision features before the projector, adds the
    target to the mean of its group and keeps the CLS token too; here the engine averages each group
    (target included) on the LLM's input embeddings, at the target's position, and the CLS token never
    reaches the LLM (transformers' LLaVA drops it). Scores come from the vision pass that builds the
    inputs (`PreparedInputs.vision_scores`), with no second pass. LLaVA-NeXT's image-newline tokens have
    no patch in the tower: they are never kept (the kept count is ``min(keep, tokens with a patch)``).
    """

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    dominant_share: float = opt(
        PAPER_DOMINANT_SHARE, "share of the kept tokens that are dominant ones (by the vision tower's attention); the rest are merged contextual tokens"
    )
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_share("dominant_share", self.dominant_share, "it is the share of the kept tokens chosen by "
                    f"attention (the paper's default is 54/64 = {PAPER_DOMINANT_SHARE})")

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        if not sum(prep.n_visual):
            return Plan(), []
        scores = prep.vision_scores()
        keeps, assigns = [], []
        for n, dominance, keys, patch in zip(prep.n_visual, scores.dominance, scores.keys, scores.patch):
            budget = keep_count(self.keep, n) if n else 0
            keep, assign = visionzip_groups(dominance, keys, patch, budget, self.dominant_share)
            keeps.append(keep)
            assigns.append(assign)
        return Plan(keep={self.layer: keeps}, merge={self.layer: assigns}), []
