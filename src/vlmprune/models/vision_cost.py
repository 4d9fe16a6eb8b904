"""What each family's vision side costs, as multiply-adds (MACs): every family's adapter carries one
`VisionCost` (``Adapter.vision_cost``), and `eval.flops` asks it. Nothing here runs a model.

Vision tower, as transformers runs it (every layer, whatever ``vision_feature_layer`` selects)::

    CLIP (LLaVA-1.5, LLaVA-NeXT), per tile of P patches + CLS = N tokens, width c, MLP width mc:
        patch conv  P * (C*p*p) * c;  per layer  4*N*c^2 + 2*N^2*c + 2*N*c*mc
    Qwen2-VL, per image of t x h x w patches (P = t*h*w), width c:
        patch conv  P * (C*tp*p*p) * c;  per block  4*P*c^2 + 2*c*t*(h*w)^2 + 2*P*c*(c*mlp_ratio)
        (attention within each frame)
    Qwen2.5-VL: SwiGLU MLP 3*P*c*m, and outside ``fullatt_block_indexes`` attention within each
        window (``window_size`` pixels square; edge windows are smaller): 2*c*sum(window^2)

Projector: LLaVA's linear-act-linear over each tile's selected features (``c*k -> d -> d``, k feature
layers); Qwen's merger over ``P / merge^2`` rows (``c*merge^2 -> c*merge^2 -> d``).

Vision scores (``PreparedInputs.vision_scores()``, the adapters' ``_cls_scores`` / ``_received_scores``)::

    CLIP (LLaVA-1.5, LLaVA-NeXT), per tile of N = P + 1 tokens, width c, in the scored layer:
        keys N*c^2 + the CLS query c^2 + its score row N*c
    Qwen2-VL / Qwen2.5-VL, per image of P patches, width c, in the last vision block:
        q, k, v 3*P*c^2 + every query against every key of its attention segment c*sum(segment^2)
        (the frame, or Qwen2.5-VL's windows when the last block is not a full-attention block)

A family prices its images as rows ``(visual tokens it gives the LLM, tower MACs, projector MACs)``,
one per image in input order; `eval.flops` assigns the rows to samples by their visual tokens.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..errors import VlmpruneError

ImageCost = tuple[int, int, int]  # (visual tokens, tower MACs, projector MACs) of one image
ScoreCost = tuple[int, int]  # (visual tokens, vision-score MACs) of one image


class VisionCost(Protocol):
    """How one family's vision side is priced (the module docstring gives the formulas)."""

    def images(self, config, n_visual: Sequence[int], pixel_values=None, image_sizes=None,
               image_grid_thw=None) -> list[ImageCost]:
        """One row per image of the batch, in input order (none when the batch has no image)."""

    def score_rows(self, config, images: list[ImageCost], image_grid_thw=None) -> list[ScoreCost]:
        """One row per image: what ``PreparedInputs.vision_scores()`` spends on it."""


# ---------------------------------------------------------------------------------------- CLIP (LLaVA)
def clip_image(config) -> ImageCost:
    """(tokens per image fed to the LLM, tower MACs, projector MACs) of one CLIP tile / LLaVA-1.5 image."""
    vc = config.vision_config
    if vc.model_type != "clip_vision_model":
        raise VlmpruneError(f"pricing a {vc.model_type} vision tower is not supported (supported: clip_vision_model)")
    p, c, mc = vc.patch_size, vc.hidden_size, vc.intermediate_size
    patches = (vc.image_size // p) ** 2
    n = patches + 1  # + CLS
    conv = patches * vc.num_channels * p * p * c
    layer = 4 * n * c * c + 2 * n * n * c + 2 * n * c * mc
    selected = patches + (config.vision_feature_select_strategy == "full")
    n_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    d = config.text_config.hidden_size
    projector = selected * (c * n_feature_layers * d + d * d)
    return selected, conv + vc.num_hidden_layers * layer, projector


class ClipCost:
    """LLaVA-1.5: every image is one CLIP tile of fixed size."""

    def images(self, config, n_visual, pixel_values=None, image_sizes=None, image_grid_thw=None) -> list[ImageCost]:
        tokens, tower, projector = clip_image(config)
        if any(n % tokens for n in n_visual):
            raise VlmpruneError(f"LLaVA images give {tokens} visual tokens each; a sample has {n_visual} visual tokens")
        n_images = sum(n_visual) // tokens
        if pixel_values is not None and pixel_values.shape[0] != n_images:
            raise VlmpruneError(f"pixel_values holds {pixel_values.shape[0]} images but the prompts have {n_images}")
        return [(tokens, tower, projector)] * n_images

    def score_rows(self, config, images, image_grid_thw=None) -> list[ScoreCost]:
        vc = config.vision_config
        n, c = (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size
        per_tile = n * c * c + c * c + n * c
        _, clip_tower, _ = clip_image(config)
        return [(tokens, tower // clip_tower * per_tile) for tokens, tower, _ in images]  # tower = tiles * clip_tower


class LlavaNextCost(ClipCost):
    """LLaVA-NeXT: CLIP tiles of each image's anyres grid (transformers' own anyres helpers)."""

    def images(self, config, n_visual, pixel_values=None, image_sizes=None, image_grid_thw=None) -> list[ImageCost]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
            unpad_image,
        )

        if image_sizes is None:
            if sum(n_visual) == 0:
                return []
            raise VlmpruneError("pricing LLaVA-NeXT's vision tower needs image_sizes (pass the inputs: flops(pm, stats, **inputs))")
        per_tile, tower, projector = clip_image(config)
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        out = []
        for size in torch.as_tensor(image_sizes).tolist():
            tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, vc.image_size)
            if tiles > 1:  # base tile + the unpadded grid of the others, a newline token ending each row
                rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vc.image_size)
                grid = unpad_image(torch.empty(1, rows * side, cols * side, device="meta"), size)
                tokens = per_tile + grid.shape[1] * (grid.shape[2] + 1)
            else:
                tokens = per_tile + 1
            out.append((tokens, tiles * tower, tiles * projector))
        return out


def llava_next_tokens(config, size) -> int:
    """Visual tokens LLaVA-NeXT gives an image of `size` (height, width): the base tile, the unpadded
    grid of the other tiles and a newline ending each of its rows (transformers' anyres helpers)."""
    return LlavaNextCost().images(config, [1], None, [[int(size[0]), int(size[1])]], None)[0][0]


# ---------------------------------------------------------------------------------------- Qwen2-VL
class QwenCost:
    """Qwen2-VL: full attention within each frame in every block, a two-matrix MLP."""

    def width(self, vc) -> int:
        return vc.embed_dim

    def out_dim(self, vc) -> int:
        return vc.hidden_size

    def mlp(self, vc, patches: int, c: int) -> int:
        return 2 * patches * c * int(c * vc.mlp_ratio)

    def block_attention(self, vc, t: int, h: int, w: int, c: int) -> list[int]:
        """Attention MACs of each block (scores and values) over one image of t x h x w patches."""
        return [2 * c * t * (h * w) ** 2] * vc.depth

    def last_block_segments(self, vc, t: int, h: int, w: int) -> list[int]:
        """Patches in each attention segment of the last vision block for one image."""
        return [h * w] * t

    def images(self, config, n_visual, pixel_values=None, image_sizes=None, image_grid_thw=None) -> list[ImageCost]:
        if image_grid_thw is None:
            if sum(n_visual) == 0:
                return []
            raise VlmpruneError(
                f"pricing the {config.model_type} vision tower needs image_grid_thw (pass the inputs: flops(pm, stats, **inputs))"
            )
        vc = config.vision_config
        c, merge, out_dim = self.width(vc), vc.spatial_merge_size, self.out_dim(vc)
        out = []
        for t, h, w in torch.as_tensor(image_grid_thw).tolist():
            patches = t * h * w
            conv = patches * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * c
            mlp = self.mlp(vc, patches, c)
            tower = conv + sum(4 * patches * c * c + a + mlp for a in self.block_attention(vc, t, h, w, c))
            merged, width = patches // merge**2, c * merge**2
            out.append((merged, tower, merged * (width * width + width * out_dim)))
        return out

    def score_rows(self, config, images, image_grid_thw=None) -> list[ScoreCost]:
        vc = config.vision_config
        c = self.width(vc)
        rows = []
        for (tokens, _, _), (t, h, w) in zip(images, torch.as_tensor(image_grid_thw).tolist() if images else []):
            segments = self.last_block_segments(vc, t, h, w)
            rows.append((tokens, 3 * t * h * w * c * c + c * sum(s * s for s in segments)))
        return rows


def window_sizes(vc, h: int, w: int) -> list[int]:
    """Qwen2.5-VL: patches in each attention window of one frame (windows of ``window_size`` pixels
    over the merged grid; edge windows hold what is left)."""
    merge = vc.spatial_merge_size
    size = vc.window_size // merge // vc.patch_size  # window side in merged tokens
    gh, gw = h // merge, w // merge
    rows = [min(size, gh - i) for i in range(0, gh, size)]
    cols = [min(size, gw - j) for j in range(0, gw, size)]
    return [r * c * merge * merge for r in rows for c in cols]


class Qwen25Cost(QwenCost):
    """Qwen2.5-VL: windowed attention outside ``fullatt_block_indexes``, a SwiGLU MLP."""

    def width(self, vc) -> int:
        return vc.hidden_size

    def out_dim(self, vc) -> int:
        return vc.out_hidden_size

    def mlp(self, vc, patches: int, c: int) -> int:
        return 3 * patches * c * vc.intermediate_size

    def block_attention(self, vc, t: int, h: int, w: int, c: int) -> list[int]:
        full_attn = 2 * c * t * (h * w) ** 2
        window_attn = 2 * c * t * sum(s * s for s in window_sizes(vc, h, w))
        return [full_attn if i in vc.fullatt_block_indexes else window_attn for i in range(vc.depth)]

    def last_block_segments(self, vc, t: int, h: int, w: int) -> list[int]:
        if (vc.depth - 1) in vc.fullatt_block_indexes:
            return [h * w] * t
        return [s for _ in range(t) for s in window_sizes(vc, h, w)]


def costs_by_sample(images: list[tuple], n_visual: Sequence[int]) -> torch.Tensor:
    """``[B, k]`` the sums over each sample's images of ``(tokens, *k costs)`` rows: images are assigned
    to samples in order, by the visual tokens each gives the LLM."""
    width = len(images[0]) - 1 if images else 0
    out = torch.zeros(len(n_visual), width, dtype=torch.float64)
    it = iter(images)
    for b, n in enumerate(n_visual):
        taken = 0
        while taken < n:
            image = next(it, None)
            if image is None:
                raise VlmpruneError(f"the image inputs run out before sample {b}'s {n} visual tokens")
            taken += image[0]
            out[b] += torch.tensor(image[1:], dtype=torch.float64)
        if taken != n:
            raise VlmpruneError(f"the image inputs give sample {b} {taken} visual tokens but its prompt has {n}")
    if next(it, None) is not None:
        raise VlmpruneError("the image inputs hold more images than the prompts' image placeholders")
    return out


def vision_score_macs(config, n_visual: Sequence[int], pixel_values=None, image_sizes=None, image_grid_thw=None):
    """``[B]`` MACs that ``PreparedInputs.vision_scores()`` spends on each sample's images (the adapters'
    ``_cls_scores`` / ``_received_scores``), for methods that state them in ``Plan.overhead``; each
    family's ``vision_cost.score_rows`` prices them (formulas in `vlmprune.models.vision_cost`)."""
    from .registry import family

    cost = family(config.model_type).vision_cost
    images = cost.images(config, list(n_visual), pixel_values, image_sizes, image_grid_thw)
    rows = cost.score_rows(config, images, image_grid_thw)
    costs = costs_by_sample(rows, n_visual)
    return costs[:, 0].clone() if rows else costs.new_zeros(len(n_visual))
