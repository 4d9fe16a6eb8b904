"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", arXiv:2502.11494): at layer K, keep the visual tokens least similar to a few pivots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ...errors import VlmpruneError
from ...validate import check_integer
from ..base import Schedule, check_keep, check_layer, keep_count, opt
from ..registry import register_method

RELEASED_KEEP = 128 / 576  # the released default: 128 of LLaVA-1.5's 576 visual tokens (max_num_trunction=128)


def pivot_counts(k: int, n_text_after: int, pivot_image: int, pivot_text: int) -> tuple[int, int]:
    """(image pivots, text pivots) of one sample keeping `k` visual tokens with `n_text_after` text tokens
    after its first visual token: ``min(pivot_image, k)`` and ``min(pivot_text, n_text_after)``."""
    return min(pivot_image, k), min(pivot_text, n_text_after)


def pivot_quotas(k: int, n_image_pivots: int, n_pivots: int) -> list[int]:
    """Tokens each pivot adds, in pivot order: the ``k - n_image_pivots`` slots left after the image
    pivots, split as evenly as the count allows (the first ``r % n_pivots`` pivots take one more)."""
    rest = k - n_image_pivots
    return [rest // n_pivots + (q < rest % n_pivots) for q in range(n_pivots)]


def dart_select(key_l1: torch.Tensor, normed: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, k: int,
                pivot_image: int, pivot_text: int) -> torch.Tensor:
    """One sample's DART choice among its present visual tokens.

    Args:
        key_l1: ``[T]`` L1 norm of each token's keys in the layer before K (all heads).
        normed: ``[T, D]`` that layer's output hidden states after the model's final norm.
        visual: ``[n]`` slots of the present visual tokens, in sequence order.
        text: ``[m]`` slots of the text tokens that can be text pivots (after the first visual token).
        k: visual tokens to keep (1 .. n).

    Returns ``[k]`` sorted positions into `visual` of the kept tokens. Image pivots: the
    ``min(pivot_image, k)`` visual tokens with the largest key L1 norm; text pivots: the
    ``min(pivot_text, m)`` text tokens with the largest (ties: lower slot). Each pivot in turn (image
    pivots first, each group by decreasing norm) adds its quota (`pivot_quotas`) of the not yet kept
    visual tokens with the lowest cosine similarity to it (ties: lower position); text pivots are not
    kept themselves.
    """
    n_img, n_txt = pivot_counts(k, int(text.numel()), pivot_image, pivot_text)
    if n_img + n_txt == 0:
        raise VlmpruneError("DART with pivot_image=0 needs text after the image in every sample (its text pivots)")
    img_pivots = torch.argsort(key_l1[visual].float(), descending=True, stable=True)[:n_img]  # positions in `visual`
    txt_pivots = text[torch.argsort(key_l1[text].float(), descending=True, stable=True)[:n_txt]]  # slots
    unit = F.normalize(normed.double(), dim=-1)  # (T, D)
    pivots = torch.cat([visual[img_pivots], txt_pivots])  # (P,) slots, in pivot order
    similarity = unit[pivots] @ unit[visual].T  # (P, n) cosine of each pivot to each visual token
    kept = torch.zeros(visual.numel(), dtype=torch.bool, device=visual.device)
    kept[img_pivots] = True
    for q, quota in enumerate(pivot_quotas(k, n_img, n_img + n_txt)):
        if quota:
            pool = (~kept).nonzero().squeeze(1)
            kept[pool[torch.argsort(similarity[q, pool], stable=True)[:quota]]] = True  # least similar first
    return kept.nonzero().squeeze(1)


@register_method("dart", kind="inside", budget="keep")
@dataclass(frozen=True)
class DART:
    """Duplication-aware token reduction: at decoder layer `layer` (K), a few pivot tokens are taken from
    layer K-1 and the visual tokens least similar to them are kept; the rest leave the sequence from K on.

        pm(**inputs, prune=vlmprune.methods.DART(layer=2, keep=0.25))

    Per sample, with ``k`` = `keep` (a ratio of the present visual tokens, or a count):

    1. pivots, from the keys layer K-1 stored in its cache (after RoPE): the ``min(pivot_image, k)``
       visual tokens and the ``min(pivot_text, m)`` text tokens after the first visual token whose keys
       have the largest L1 norm over all heads;
    2. similarity: cosine of layer K-1's output hidden states after the model's final norm;
    3. the image pivots are kept; the ``k - image pivots`` other slots are split evenly over the pivots
       (image pivots first, each group by decreasing norm), and each pivot in turn adds the tokens of
       those not yet kept that are least similar to it (`dart_select`). No attention map is read.

    As released (github:ZichenWen1/DART, read from its fork xqy1111111/DART at d6a5af6;
    ``llava/model/language_model/modeling_llama_self.py``): K=2 (``llava/eval/model_vqa_loader.py:172``);
    4 image and 4 text pivots (``:177-178``); pivots by the L1 norm of the layer-(K-1) keys after RoPE
    (``modeling_llama_self.py:342, 419-428``); the hidden states of layer K-1 through the final norm
    (``:340-341``); text pivots among every token after the image (``:422``); for each pivot the
    ``TOKEN_TOPK`` tokens of lowest cosine among the not yet chosen visual tokens (``:434-443``); text
    pivots removed, image pivots kept (``:445``). Qwen2-VL is the same
    (``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py:401-445``).

    Deviations: the budget is exact, ``k`` visual tokens in all (the released code keeps the image
    pivots plus ``TOKEN_TOPK = ceil(budget // pivots)`` per pivot, e.g. 4 + 8 x 16 = 132 for a budget of
    128, ``modeling_llama_self.py:409``); pivots are visited image pivots first, each group by
    decreasing norm (the released code iterates a Python set, whose order is the integers' hash order);
    cosine similarities are computed in float64; with several images, text pivots are the text tokens
    after the first visual token and every visual token of the sample is one pool (the released code
    assumes one image span); it runs on padded batches (the released code asserts batch 1).

    Pricing: the similarity product, ``pivots x n_visual x hidden`` multiply-adds per sample, counts as
    the method's scoring (``Plan.overhead``, priced for the prompt's visual tokens: after an earlier
    token stage of another method it is an upper bound). The norms are not counted (as everywhere).
    """

    layer: int = opt(2, "K: tokens leave from this decoder layer on; pivots and similarity come from layer K-1")
    keep: float | int = opt(RELEASED_KEEP, "visual tokens kept: a share in (0, 1] of the present ones, or a count")
    pivot_image: int = opt(4, "visual pivots (largest key L1 norm); kept, and each adds its share of tokens")
    pivot_text: int = opt(4, "text pivots after the image (largest key L1 norm); add tokens, not kept")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_integer(
            self.layer, f"DART reads layer K-1's keys and hidden states, so layer K must be an integer >= 1, got {self.layer!r}", 1
        )
        for name in ("pivot_image", "pivot_text"):
            value = getattr(self, name)
            check_integer(value, f"DART {name} must be a token count >= 0, got {value!r} (the released default is 4)", 0)
        if self.pivot_image + self.pivot_text == 0:
            raise VlmpruneError(
                "DART needs at least one pivot: give pivot_image or pivot_text >= 1 (the released default is 4 and 4)"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def _overhead(self, shapes, hidden: int) -> list[float]:
        """Per sample, the multiply-adds of the pivot-to-visual similarity product: P * n * hidden."""
        out = []
        for s in shapes:
            if not s.n_visual:
                out.append(0.0)
                continue
            n_img, n_txt = pivot_counts(keep_count(self.keep, s.n_visual), s.text_after, self.pivot_image, self.pivot_text)
            out.append(float((n_img + n_txt) * s.n_visual * hidden))
        return out

    def decide(self, pm, prep):
        from ..budget import sample_shapes

        check_layer(self.layer, pm.n_layers, lowest=1)
        return Plan(overhead=self._overhead(sample_shapes(prep), pm.adapter.text_config.hidden_size)), [self]

    def schedule(self, sample, n_layers: int) -> Schedule:
        """From layer K on, keep's count of the visual tokens (no attention rows are read)."""
        check_layer(self.layer, n_layers, lowest=1)
        return Schedule(keep={self.layer: keep_count(self.keep, sample.n_visual)} if sample.n_visual else {})

    def lm_counts(self, pm, prep):
        """The language model's work as counts (for `AtFlops`), the similarity product included."""
        from ...counts import LMCounts
        from ..budget import sample_shapes

        shapes = sample_shapes(prep)
        counts = LMCounts.from_schedule(
            [s.n_text for s in shapes], [s.n_visual for s in shapes], pm.n_layers,
            [self.schedule(s, pm.n_layers).keep for s in shapes],
        )
        counts.overhead = torch.tensor(self._overhead(shapes, pm.adapter.text_config.hidden_size), dtype=torch.float64)
        return counts

    def select(self, layer, view):
        state = view.state
        if view.last_layer is None:
            raise VlmpruneError(
                f"DART at layer {layer} reads the keys of the layer run before it, and none ran since the start "
                "or the last token stage; act at a later layer or skip fewer layers"
            )
        home = state.valid.device
        keys = view.cache.keys[view.last_layer]  # (B, Hkv, T, hd) after RoPE, on that layer's device
        key_l1 = keys.float().abs().sum(dim=(1, 3)).to(home)  # (B, T); repeating kv heads would scale it only
        at = view.adapter.placement().norm
        normed = view.adapter.decoder.norm(state.hidden.to(at)).to(home)  # (B, T, D) as the released code
        t = torch.arange(state.valid.shape[1], device=home)
        rows = []
        for b in range(state.batch_size):
            is_visual = state.visual_index[b] >= 0
            visual = is_visual.nonzero().squeeze(1)
            if not visual.numel():
                rows.append(torch.zeros(0, dtype=torch.long))
                continue
            text = (state.valid[b] & ~is_visual & (t > visual[0])).nonzero().squeeze(1)
            k = keep_count(self.keep, int(visual.numel()))
            chosen = dart_select(key_l1[b], normed[b], visual, text, k, self.pivot_image, self.pivot_text)
            rows.append(state.visual_index[b, visual[chosen]].cpu())
        return rows
