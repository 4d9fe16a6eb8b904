"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs", NeurIPS 2025, arXiv:2506.10967): a conditional DPP over the visual tokens,
decided before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ..base import check_keep, check_layer, keep_count, opt
from ..registry import register_method

EXHAUSTED = 1e-10  # a marginal gain at or below this: the kernel's rank is used up (float64 rounding)
TIE = 1e-12  # gains this close are equal: identical tokens (LLaVA-NeXT's newlines) differ only by rounding


def relevance(visual: torch.Tensor, text: torch.Tensor, negate: bool = False) -> tuple[torch.Tensor, float]:
    """``[n]`` instruction relevance of each visual token, and the multiply-adds spent.

    The mean cosine of the token's features to each text token's (``visual [n, d]``, ``text [m, d]``),
    negated with `negate`, min-max normalised over the sample's tokens as released:
    ``(r - min + 1e-6) / (max - min)`` (all ones when every token has the same relevance)."""
    v, t = F.normalize(visual.double(), dim=-1), F.normalize(text.double(), dim=-1)
    r = (v @ t.T).mean(1)  # (n,) mean cosine to the instruction's tokens
    if negate:
        r = -r
    span = r.max() - r.min()
    r = (r - r.min() + 1e-6) / span if float(span) > 0 else torch.ones_like(r)
    return r, float(visual.shape[0] * text.shape[0] * visual.shape[1])


def conditional_kernel(features: torch.Tensor, quality: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``L = diag(q) S diag(q)`` ``[n, n]`` (float64), S the cosine similarity of ``features [n, d]``, and
    the multiply-adds of S."""
    unit = F.normalize(features.double(), dim=-1)
    similarity = unit @ unit.T  # (n, n)
    return quality[:, None] * similarity * quality[None, :], float(features.shape[0] ** 2 * features.shape[1])


def dpp_greedy(kernel: torch.Tensor, k: int, quality: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Greedy MAP inference of a DPP with kernel ``L [n, n]``: ``k`` indices, each step adding the item
    that most increases ``log det L_Y``, and the multiply-adds of the updates.

    Fast form of Chen et al. (2018, "Fast Greedy MAP Inference for Determinantal Point Process to
    Improve Recommendation Diversity", arXiv:1709.05135, Alg. 1): ``d_i^2`` is item i's marginal gain
    ``det L_{Y+i} / det L_Y``; after picking j, ``e = (L_j - c_j C^T) / d_j``, ``c_i`` grows by ``e_i``
    and ``d_i^2 -= e_i^2``. Ties (gains within `TIE`): the lower index. Once no gain exceeds
    `EXHAUSTED` (the subset spans the kernel's range), the remaining picks follow `quality`, highest
    first (ties: lower index).
    Returns the indices in the order picked.
    """
    n = kernel.shape[0]
    c = kernel.new_zeros(n, k)  # (n, k) the incremental Cholesky rows
    gain = kernel.diagonal().clone()  # (n,) d_i^2
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order, macs = [], 0.0
    for i in range(k):
        masked = gain.masked_fill(chosen, float("-inf"))
        best = masked.max()
        if float(best) <= EXHAUSTED:
            rest = (~chosen).nonzero().squeeze(1)
            order.extend(rest[torch.argsort(quality[rest], descending=True, stable=True)][: k - i].tolist())
            break
        j = int((masked >= best - TIE).nonzero()[0])
        order.append(j)
        chosen[j] = True
        if i == k - 1:
            break
        row = kernel[j].clone()  # (n,)
        if i:
            row -= (c[j : j + 1, :i] @ c[:, :i].T)[0]  # (1, i) @ (i, n): c_j . c_n for every n
            macs += i * n
        e = row / gain[j].sqrt()
        c[:, i] = e
        gain = gain - e * e
    return torch.tensor(order, dtype=torch.long), macs


@register_method("cdpruner", kind="before", budget="keep")
@dataclass(frozen=True)
class CDPruner:
    """Keep the `keep` visual tokens (ratio or count of each sample's visual tokens) that a conditional
    DPP selects: kernel ``L_ij = r_i * cos(x_i, x_j) * r_j`` over the projected visual tokens ``x`` (the
    LLM's input embeddings at the image placeholders), ``r`` their relevance to the instruction, and
    greedy MAP inference (`dpp_greedy`). The plan acts at decoder layer `layer` (0 = the LLM's input).

        pm(**inputs, prune=vlmprune.methods.CDPruner(keep=64))

    Relevance (`relevance`): the mean cosine between a visual token's input embedding and the input
    embeddings of the instruction's text tokens (the text after the sample's first visual token),
    min-max normalised per sample.

    As released (github:Theia-4869/CDPruner, ``llava/model/llava_arch.py``): similarity = cosine of the
    projected visual features (``:148-153``); relevance = the mean over the instruction's CLIP text
    embeddings of the cosine with the CLIP-projected patch embeddings, negated, min-max normalised with
    ``+1e-6`` (``:156-160``; ``multimodal_encoder/clip_encoder.py:79-95``); kernel ``r_i S_ij r_j``
    (``:167``); the fast greedy MAP loop (``:170-181``); kept tokens in sequence order (``:183-185``);
    the token count is a given number per image (LLaVA-NeXT: per tile, README "32 * 5 = 160").

    Deviations: relevance uses what every family has, the LLM's text input embeddings against the
    projected visual tokens, in place of CLIP's text tower against CLIP's projected patch features
    (LLaVA's CLIP text tower is not part of a LLaVA checkpoint, Qwen2-VL has none), and is not negated
    by default (the released sign belongs to CLIP's penultimate-layer features; ``negate_relevance=True``
    gives it); it is normalised per sample (the released min-max spans the whole batch of images or
    tiles); the DPP runs over all of a sample's visual tokens as one pool with one budget (the released
    code keeps a count per tile and always keeps LLaVA-NeXT's newline tokens, ``llava_arch.py:242-246``);
    kernel and updates in float64; once the kernel's rank is exhausted the rest are picked by
    relevance (the released loop would take the square root of a non-positive gain); a sample without
    text after its first visual token is refused.

    Pricing, per sample of ``n`` visual tokens, ``m`` instruction tokens, hidden ``d``, ``k`` kept:
    ``n^2 d`` (similarity) + ``n m d`` (relevance) + ``n (k-1)(k-2) / 2`` (the greedy updates) multiply-adds,
    counted as the method's scoring (``Plan.overhead``, what the run computed).
    """

    keep: float | int = opt(0.25, "visual tokens kept: a share in (0, 1] of each sample's, or a count")
    layer: int = opt(0, "the decoder layer the kept tokens apply from (0 = the LLM's input)")
    negate_relevance: bool = opt(False, "True: the released sign, relevance = -cos (meant for CLIP features)")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        if not isinstance(self.negate_relevance, bool):
            raise VlmpruneError(f"CDPruner negate_relevance must be True or False, got {self.negate_relevance!r}")

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        if not sum(counts):
            return Plan(), []
        real = prep.attention_mask.bool()
        visual = prep.visual_mask & real
        t = torch.arange(real.shape[1], device=real.device)
        rows, overhead = [], []
        for b, n in enumerate(counts):
            if not n:
                rows.append(torch.zeros(0, dtype=torch.long))
                overhead.append(0.0)
                continue
            first = int(visual[b].nonzero()[0])
            text = real[b] & ~visual[b] & (t > first)
            if not bool(text.any()):
                raise VlmpruneError(
                    f"CDPruner needs the instruction after the image: sample {b} has no text after its first visual token"
                )
            features = prep.inputs_embeds[b][visual[b]].detach()  # (n, D) projected visual tokens, in sequence order
            r, macs_r = relevance(features, prep.inputs_embeds[b][text].detach(), self.negate_relevance)
            kernel, macs_s = conditional_kernel(features, r)
            order, macs_g = dpp_greedy(kernel, keep_count(self.keep, n), r)
            rows.append(order.sort().values)
            overhead.append(macs_r + macs_s + macs_g)
        return Plan(keep={self.layer: rows}, overhead=overhead), []
