"""HoloV (Zou et al., NeurIPS 2025, "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual
Holistic Context Retention", arXiv:2510.02912; code github:obananas/HoloV): the budget is spread over
crops of the image by each crop's score, and each crop keeps its own best tokens, so no region is
emptied; decided before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ...validate import check_integer, check_number
from ..base import check_keep, check_layer, keep_count, opt
from ..registry import register_method
from .vispruner import tower_scores

EPS = 1e-6  # the released `esp` (llava/model/utils.py:22)
ATTENTION_SCALE = 1e3  # attention is scaled by 1e3 before it is mixed with the variance (utils.py:84)
CROPS_PER_RATIO = 1024 / 576  # crops = int(CROPS_PER_RATIO * n / k) (qwen-model-HoloV/modeling_qwen2_5_vl.py:1916)


def holov_crops(n: int, budget: int) -> int:
    """The released crop count for `budget` of `n` tokens: ``max(1, int((1024 / 576) * n / budget))``
    (16 for LLaVA-1.5's 64 of 576, the LLaVA code's fixed value)."""
    return max(1, int((CROPS_PER_RATIO * n) / budget))


def holov_select(
    attention: torch.Tensor, features: torch.Tensor, patch: torch.Tensor, budget: int, crops: int | None, beta: float
) -> tuple[torch.Tensor, float]:
    """One sample's HoloV decision over its ``n`` visual tokens.

    Args:
        attention: ``[n]`` the vision tower's attention to each token.
        features: ``[n, D]`` each token's features (the LLM's input embeddings).
        patch: ``[n]`` bool, False for tokens with no vision-tower patch (left out of every crop).
        budget: tokens to keep, ``K`` (capped at the tokens with a patch).
        crops: crop count ``C`` (None: `holov_crops`).
        beta: weight of the similarity variance in a token's score.

    Returns (keep, macs): the sorted kept indices and the multiply-adds of the similarity products.

    Crops: the ``m`` tokens with a patch, in sequence order, cut into ``C`` runs of ``m // C`` tokens,
    the first ``m % C`` runs one longer (empty runs dropped). A run of one token scores its attention;
    a longer run of ``s`` tokens with cosine similarities ``S`` (features over ``|f| + 1e-6``) and the
    diagonal set to 0 gives token ``i`` the variance ``v_i = sum_j (S_ij - mean_i)^2 / (s - 1)``,
    ``mean_i = sum_j S_ij / (s - 1)``, and the score ``a_i + beta * v_i * mean|a| / (mean|v| + 1e-6)``
    with ``a = 1e3 * attention``; the run scores the mean of its tokens'. Budget: weights ``w = score /
    (sum + 1e-6)``, each run ``floor(w * K)`` tokens, the remainder one each to the runs of largest
    weight (ties: earlier run). A run keeps its top-attention tokens (ties: lower index), or all of
    them when its share is at least its size (the excess is not passed on).
    """
    candidates = patch.nonzero().squeeze(1)
    n = candidates.numel()
    budget = min(budget, n)
    if budget < 1:
        return candidates[:0], 0.0
    n_crops = crops if crops is not None else holov_crops(n, budget)
    sizes = [n // n_crops + (1 if p < n % n_crops else 0) for p in range(n_crops)]
    runs = [r for r in candidates.split(sizes) if r.numel()]
    attention = attention.detach().float()
    scores, macs = [], 0.0
    for run in runs:
        a = attention[run]
        s = run.numel()
        if s <= 1:
            scores.append(float(a.mean()))
            continue
        f = features[run].detach().float()
        unit = f / (f.norm(dim=1, keepdim=True) + EPS)
        similarity = (unit @ unit.T) * (1 - torch.eye(s, device=unit.device))  # (s, s) cosine, 0 on the diagonal
        macs += s * s * f.shape[1]
        mean = similarity.sum(1) / (s - 1)
        variance = ((similarity - mean[:, None]) ** 2).sum(1) / (s - 1)
        scaled = a * ATTENTION_SCALE
        balance = scaled.abs().mean() / (variance.abs().mean() + EPS)
        scores.append(float((scaled + beta * variance * balance).mean()))
    weights = torch.tensor(scores, dtype=torch.float64)
    weights = weights / (weights.sum() + EPS)
    shares = torch.floor(weights * budget).long()
    remaining = budget - int(shares.sum())
    if remaining > 0:
        shares[torch.argsort(weights, descending=True, stable=True)[:remaining]] += 1
    kept = []
    for run, share in zip(runs, shares.tolist()):
        if share >= run.numel():
            kept.append(run)
        elif share > 0:
            kept.append(run[torch.argsort(attention[run], descending=True, stable=True)[:share]])
    return torch.cat(kept).sort().values if kept else candidates[:0], macs


@register_method("holov", kind="before", budget="keep")
@dataclass(frozen=True)
class HoloV:
    """Keep up to `keep` visual tokens (ratio or count of each sample's visual tokens), chosen before
    the LLM crop by crop (`holov_select`): the sample's visual tokens are cut into `crops` runs (None:
    the released rule ``max(1, int(1024/576 * n / k))``, 16 for 64 of 576); each run is scored by the
    vision tower's attention (LLaVA: the CLS token's, mean over heads; Qwen2-VL / Qwen2.5-VL: the mean
    attention received in the last vision block, as VisionZip here) plus `beta` times the variance of
    its tokens' feature similarities (LLM input embeddings), rescaled to the attention's magnitude; the
    budget is split over the runs in proportion to their scores, and each run keeps its highest-attention
    tokens. The plan acts at decoder layer `layer` (0 = the LLM's input).

        pm(**inputs, prune=vlmprune.methods.HoloV(keep=64))   # 16 crops of LLaVA-1.5's 576 tokens

    Priced: the vision scores (`eval.flops.vision_score_macs`) and each crop's similarity product
    (``s^2 * D``) are in ``Plan.overhead``, so they count as scoring.

    Released code (github:obananas/HoloV): ``HoloV`` in llava/model/utils.py:22-151 (LLaVA) and
    qwen-model-HoloV/utils.py:43-198 (Qwen2.5-VL). Crops are contiguous runs of the flattened token
    sequence, ``N // C`` tokens each and the first ``N % C`` one longer (utils.py:33-50); not 2-D
    windows. Token score ``alpha * 1e3 * attn + beta * var * scale`` with alpha = 1, beta = 0.09
    (qwen utils.py:47-48, 117-125; LLaVA utils.py:25, 84-92); crop score = mean (:95), a one-token crop
    its raw attention (:63); allocation floor + remainder by top weight (:104-112); overflow kept whole,
    within a crop ``topk`` by attention (:118-127). Crop count: LLaVA fixed 16 with 64 tokens
    (llava/model/llava_arch.py:239), Qwen ``max(1, int((1024/576) * N / K))`` (modeling_qwen2_5_vl.py:1916),
    which gives 16 in LLaVA's setting. Attention: LLaVA the CLS row of the selected layer, head mean
    (clip_encoder.py:37-40, llava_arch.py:143); Qwen the last block's weights averaged over heads and
    queries (modeling_qwen2_5_vl.py:590-611). Features: the projected tokens, the LLM's inputs
    (llava_arch.py:144; Qwen ``inputs_embeds``, :1903).

    Differences from the released code: a crop whose share is larger than the crop keeps all of its
    tokens and the excess is not re-allocated, as released, but the released code then pads the image
    with zero vectors up to K tokens (utils.py:140-143); here nothing is padded, so a sample may keep
    fewer than `keep` tokens (the run's stats say how many). Ties in the sorts go to the lower index
    (the released ``topk`` leaves them unspecified); scores are computed in float32, the budget split
    in float64. Kept tokens keep their original positions, in sequence order (the released code
    concatenates crops in top-attention order). Qwen2.5-VL: the released code averages the attention
    in the tower's window order but pairs it with tokens in image order (the ``reverse_indices`` of
    :602 are applied to the features only); here both are in image order. LLaVA-NeXT: the released
    code leaves the image-newline tokens out (llava_arch.py:192-199, commented out); here too, they are
    never kept (no patch). Several images of one sample are cut into crops together, as the released
    LLaVA code concatenates them.
    """

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    crops: int | None = opt(None, "crops the visual sequence is cut into (None: HoloV's rule, about 1024/576 x n / keep)")
    beta: float = opt(0.09, "weight of the similarity variance in a token's score, against its attention")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if self.crops is not None:
            check_integer(self.crops, f"crops={self.crops!r}: give a crop count >= 1, or None for the released rule "
                          "max(1, int(1024/576 * n / keep))", 1)
        check_number(self.beta, f"beta={self.beta!r} must be a number >= 0: the weight of the similarity variance "
                     "in a token's score (released: 0.09)", 0)

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        if not sum(counts):
            return Plan(), []
        scores, overhead = tower_scores(pm, prep, self.method_name)
        real = prep.visual_mask & prep.attention_mask
        rows = []
        for b, (n, attention, patch) in enumerate(zip(counts, scores.dominance, scores.patch)):
            embeds = prep.inputs_embeds[b][real[b]]  # (n, D) the LLM's input embeddings of the visual tokens
            kept, macs = holov_select(attention, embeds, patch, keep_count(self.keep, n) if n else 0, self.crops, self.beta)
            rows.append(kept)
            overhead[b] += macs
        return Plan(keep={self.layer: rows}, overhead=overhead), []
