"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", arXiv:2412.01818; code github:Theia-4869/VisPruner): important tokens
by the vision tower's attention, then diverse tokens from the rest by removing near-duplicates,
decided before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ...models.vision_cost import vision_score_macs
from ..base import check_keep, check_layer, check_share, keep_count, opt
from ..registry import register_method

REMOVED_PER_ROUND = 8  # near-duplicates removed per matching round (released llava/model/llava_arch.py:163)


def tower_scores(pm, prep, method: str):
    """``prep.vision_scores()`` and, per sample, the multiply-adds of computing them (the start of the
    method's ``Plan.overhead``); a `VlmpruneError` that names `method` and what to use instead when the
    tower has no such scores."""
    try:
        scores = prep.vision_scores()
    except VlmpruneError as err:
        raise VlmpruneError(
            f"{method} needs the vision tower's attention to each visual token: {err}; for this model use a "
            "method that reads the language model's attention (fastv, pdrop, sparsevlm) or none (pool, random)"
        ) from err
    return scores, vision_score_macs(pm.config, prep.n_visual, **prep.image_inputs)


def vispruner_select(
    importance: torch.Tensor, features: torch.Tensor, patch: torch.Tensor, budget: int, important_share: float
) -> tuple[torch.Tensor, float]:
    """One sample's VisPruner decision over its ``n`` visual tokens.

    Args:
        importance: ``[n]`` the vision tower's attention to each token (higher = more important).
        features: ``[n, f]`` the tower's features of each token (cosine similarity finds duplicates).
        patch: ``[n]`` bool, False for tokens with no vision-tower patch (never kept).
        budget: tokens to keep, ``T`` (capped at the tokens with a patch).
        important_share: ``r``; ``int(T * r)`` tokens are kept as important, the rest are diverse.

    Returns (keep, macs): the sorted kept indices and the multiply-adds of the similarity products.

    Important: the ``int(T * r)`` tokens of highest importance (ties: lower index). The others form
    the residual, ordered by importance (descending). While the residual holds more than the
    ``T - int(T * r)`` diverse tokens: split it into its even and odd places (``a = res[0::2]``,
    ``b = res[1::2]``), score each token of ``a`` by its largest cosine similarity to any token of
    ``b``, and remove the ``min(8, |res| - diverse)`` tokens of ``a`` with the highest scores (all of
    ``a`` if it holds fewer; ties: earlier place); the residual becomes the rest of ``a``, by
    descending score, followed by ``b``.
    What is left are the diverse tokens.
    """
    candidates = patch.nonzero().squeeze(1)
    budget = min(budget, candidates.numel())
    n_important = int(budget * important_share)
    n_diverse = budget - n_important
    ranked = candidates[torch.argsort(importance[candidates].float(), descending=True, stable=True)]
    important, residual = ranked[:n_important], ranked[n_important:]
    unit = features.float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    macs = 0.0
    while n_diverse > 0:
        removed = min(REMOVED_PER_ROUND, residual.numel() - n_diverse)
        if removed <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        similarity = unit[a] @ unit[b].T  # (|a|, |b|) cosine of the features
        macs += a.numel() * b.numel() * unit.shape[1]
        distinct = torch.argsort(similarity.amax(1), descending=True, stable=True)[removed:]
        residual = torch.cat([a[distinct], b])
    kept = torch.cat([important, residual]) if n_diverse > 0 else important
    return kept.sort().values, macs


@register_method("vispruner", kind="before", budget="keep")
@dataclass(frozen=True)
class VisPruner:
    """Keep `keep` visual tokens (ratio or count of each sample's visual tokens) chosen before the LLM
    from the vision tower's own cues (`vispruner_select`): ``int(keep * important_share)`` important
    tokens, those the tower attends to most (LLaVA: the CLS token's attention, mean over heads, in the
    layer ``vision_feature_layer`` selects; Qwen2-VL / Qwen2.5-VL, which have no CLS token: the mean
    attention a token receives in the last vision block, as VisionZip here), then diverse tokens from
    the rest by removing near-duplicates of the tower's features (cosine similarity), 8 per round, until
    the budget is met. The plan acts at decoder layer `layer` (0 = the LLM's input).

        pm(**inputs, prune=vlmprune.VisPruner(keep=64))                      # 32 important + 32 diverse
        pm(**inputs, prune=vlmprune.VisPruner(keep=64, important_share=0.75))  # 48 + 16, as the paper's MME run

    Priced: the vision scores (`eval.flops.vision_score_macs`: one q/k projection of one tower layer)
    and the similarity products of every round are in ``Plan.overhead``, so they count as scoring.

    Released code (github:Theia-4869/VisPruner, llava/model/llava_arch.py:141-186 and
    llava/model/multimodal_encoder/clip_encoder.py:36-52): important = ``int(T * r)`` (:150), the CLS
    row ``attentions[select_layer][:, :, 0, 1:]`` averaged over heads (clip_encoder.py:43,
    llava_arch.py:154); similarity of the selected layer's features before the projector, L2-normalised
    (:160); the matching loop :161-176 (``r = min(8, R - T_div)``, even/odd split, max over the odd
    tokens, keep ``argsort(desc)[r:]`` of the even ones followed by the odd ones); default ``r = 0.5``
    (llava/eval/model_vqa_loader.py:152); SigLIP towers (no CLS) use the last layer's attention averaged
    over queries (siglip_encoder.py:38-39), which is what the Qwen scores here are.

    Differences from the released code: ties in the two sorts go to the lower index / earlier place
    (the released ``argsort`` is unstable), and the similarity is computed in float32. The kept tokens
    keep their original positions (the engine's layer-0 drop) instead of being packed in sequence.
    LLaVA-NeXT: the released code keeps ``T`` tokens of every tile (576 patches each, before unpadding)
    and always keeps the image-newline tokens; here ``T`` is the sample's budget over its tokens with a
    patch, and newline tokens, which have no patch, are never kept (as VisionZip here). Qwen: the
    released code has no Qwen2-VL path; the features are the merger's input (the token's 2x2 patches
    concatenated), the analogue of LLaVA's pre-projector features.
    """

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    important_share: float = opt(
        0.5, "share of the kept tokens chosen as important (by the vision tower's attention); the rest are diverse"
    )
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_share("important_share", self.important_share, "it is the share of the kept tokens chosen by the "
                    "vision tower's attention (the paper's default is 0.5; the rest are diverse tokens)")

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        if not sum(counts):
            return Plan(), []
        scores, overhead = tower_scores(pm, prep, self.method_name)
        rows = []
        for b, (n, importance, features, patch) in enumerate(zip(counts, scores.dominance, scores.features, scores.patch)):
            kept, macs = vispruner_select(importance, features, patch, keep_count(self.keep, n) if n else 0,
                                          self.important_share)
            rows.append(kept)
            overhead[b] += macs
        return Plan(keep={self.layer: rows}, overhead=overhead), []
