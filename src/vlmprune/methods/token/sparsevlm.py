"""SparseVLM (Zhang et al., 2024, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", arXiv:2410.04417)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ...validate import is_integer, is_share
from ..base import Schedule, check_stages, keep_count, opt, stage_layers
from ..registry import register_method


@register_method("sparsevlm", kind="inside", budget="keep")
@dataclass(frozen=True)
class SparseVLM:
    """Text-guided, multi-stage visual-token sparsification with token recycling.

    At each stage layer K (at fractions `stages` of the depth), with the attention of layer K-1:

    1. raters: the text tokens that can see the image (after the first visual token) whose attention
       mass on the visual tokens (mean over heads) is at least the mean over those text tokens;
    2. each present visual token's score is the raters' mean attention to it;
    3. a share lambda = keep ** (1 / n_stages) of the present tokens survives: the top-scored ones,
       except that `recycle` of the deleted tokens with the highest scores are clustered (centres: the
       best-scored of them, one per `cluster_size`; members join the most similar centre by cosine
       of hidden states) and each cluster is merged into its centre, which takes one of the kept slots.
    """

    keep: float = opt(0.25, "the final share of visual tokens, in (0, 1], after the last stage")
    stages: tuple[float, ...] = opt((2 / 32, 6 / 32, 15 / 32), "fractions of the depth in (0, 1) where the stages prune, increasing")
    recycle: float = opt(0.3, "share in [0, 1] of each stage's deleted tokens (the best-scored) recycled into merged cluster centres")
    cluster_size: int = opt(4, "recycled tokens per cluster centre (>= 1)")

    def __post_init__(self) -> None:
        check_stages("SparseVLM", self.keep, self.stages)
        if not is_share(self.recycle) or not is_integer(self.cluster_size) or self.cluster_size < 1:
            raise VlmpruneError("SparseVLM needs recycle in [0, 1] and cluster_size >= 1")

    def decide(self, pm, prep):
        return Plan(), [_Stages(stage_layers(self.stages, pm.n_layers), self)]

    def schedule(self, sample, n_layers: int) -> Schedule:
        """A share lambda of the present tokens per stage (merged centres take kept slots); the text
        after the image is scored in the layer before each stage."""
        layers = stage_layers(self.stages, n_layers)
        lam, keep, present = self.keep ** (1 / len(layers)), {}, sample.n_visual
        for layer in layers:
            keep[layer] = present = keep_count(float(lam), present)
        return Schedule(keep=keep, score_rows={layer - 1: sample.text_after for layer in layers})


def rater_scores(probs: torch.Tensor, text_rows: torch.Tensor, visual_cols: torch.Tensor) -> torch.Tensor:
    """Visual scores of one sample from head-mean attention ``probs [R, L]`` of its text rows.

    `text_rows` marks which rows are real text queries, `visual_cols` which keys are visual tokens.
    Returns ``[L]`` scores (meaningful at visual columns).
    """
    mass = probs[:, visual_cols].sum(-1)  # (R,) attention each text token pays to the image
    real = mass[text_rows]
    raters = text_rows & (mass >= real.mean())
    return probs[raters].mean(0)


@dataclass(frozen=True)
class _Stages:
    layers: tuple[int, ...]
    cfg: SparseVLM

    def select(self, layer, view):
        state = view.state
        bsz, length = state.valid.shape
        t = torch.arange(length, device=state.valid.device)
        first_visual = torch.where(state.visual_index >= 0, t, length).amin(1, keepdim=True)
        text = state.valid & (state.visual_index < 0) & (t > first_visual)  # text that can see the image
        counts = text.sum(1)
        if bool((counts == 0).any()):
            raise VlmpruneError("SparseVLM needs text after the image in every sample (its raters)")
        width = int(counts.max())
        # query rows: each sample's text positions, padded by repeating its last one (flagged not real)
        order = torch.sort(torch.where(text, t, length + t), dim=1).indices[:, :width]
        real = torch.arange(width)[None] < counts[:, None]
        rows = torch.where(real, order, order.gather(1, (counts - 1)[:, None]))
        probs = view.attention_rows(rows).mean(1)  # (B, R, L)
        lam = self.cfg.keep ** (1 / len(self.layers))
        keeps, assigns = [], []
        for b in range(bsz):
            visual = state.visual_index[b] >= 0
            scores = rater_scores(probs[b], real[b], visual)
            present = state.visual_index[b][visual]  # visual indices, in sequence order
            s = scores[visual]
            keep, assign = _choose(s, present, state.hidden[b][visual], keep_count(float(lam), int(present.numel())), self.cfg)
            full = torch.full((view.n_visual[b],), -1, dtype=torch.long)  # original numbering; absent -> -1
            full[present.cpu()] = assign.cpu()
            keeps.append(keep.cpu())
            assigns.append(full)
        return Plan(keep={layer: keeps}, merge={layer: assigns})


def _choose(scores, present, hidden, k: int, cfg: SparseVLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept visual indices and each present token's merge target (visual index, or -1)."""
    ranked = torch.argsort(scores, descending=True, stable=True)
    n = present.numel()
    deleted = ranked[k:]
    n_recycled = min(len(deleted), math.ceil(cfg.recycle * len(deleted))) if k < n else 0
    n_centres = min(k - 1, math.ceil(n_recycled / cfg.cluster_size)) if n_recycled else 0
    kept_pos = ranked[: k - n_centres]
    recycled = deleted[:n_recycled]
    centres = recycled[:n_centres]
    assign = torch.full((n,), -1, dtype=torch.long)
    assign[kept_pos] = present[kept_pos]
    if n_centres:
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        similarity = unit[recycled] @ unit[centres].T  # (n_recycled, n_centres)
        nearest = centres[similarity.argmax(1)]
        assign[recycled] = present[nearest]
        assign[centres] = present[centres]
    keep = torch.sort(present[torch.cat([kept_pos, centres])]).values
    return keep, assign

