"""Qwen2-VL and Qwen2.5-VL: 3-axis mRoPE positions from the model's own ``get_rope_index``.

``mm_token_type_ids`` (text 0, image 1, video 2) is always derived from ``input_ids`` here. Without it,
transformers' Qwen2.5-VL silently falls back to 1-D positions; a given one must agree with input_ids.
"""

from __future__ import annotations

import torch

from ..errors import VlmpruneError
from .base import Adapter, PreparedInputs


class Qwen2VLAdapter(Adapter):
    families = ("qwen2_vl", "qwen2_5_vl")
    position_axes = 3

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.config.video_token_id] = 2
        return types

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> PreparedInputs:
        mask = self._check_ids(input_ids, attention_mask)
        types = self.token_types(input_ids)
        if bool((types == 2).any()):
            raise VlmpruneError("video inputs are not supported yet; pass images only")
        if mm_token_type_ids is not None and not torch.equal(mm_token_type_ids.to(types), types):
            raise VlmpruneError(
                "mm_token_type_ids disagrees with input_ids (image tokens must be 1, text 0); "
                "pass the processor's output unchanged or leave mm_token_type_ids out"
            )
        visual = types == 1
        embeds = self.decoder.embed_tokens(input_ids)
        features = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise VlmpruneError("Qwen2-VL needs image_grid_thw (the processor returns it with pixel_values)")
            out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            features = torch.cat(list(out.pooler_output), dim=0)
        embeds = self._scatter_visual(embeds, visual, features)
        if image_grid_thw is not None:
            positions, _ = self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=mask.long()
            )
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        return PreparedInputs(input_ids, embeds, positions, mask, visual, self._grids(visual, image_grid_thw))

    def _grids(self, visual: torch.Tensor, image_grid_thw: torch.Tensor | None) -> list:
        """One (rows, cols) grid per sample holding exactly one image (after the 2x2 patch merge)."""
        if image_grid_thw is None:
            return [None] * visual.shape[0]
        merge = self.config.vision_config.spatial_merge_size
        sizes = iter((image_grid_thw.prod(-1) // merge**2).tolist())
        shapes = iter([(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()])
        grids = []
        for n in visual.sum(1).tolist():
            taken, shape, count = 0, None, 0
            while taken < n:
                taken += next(sizes)
                shape = next(shapes)
                count += 1
            grids.append(shape if count == 1 else None)
        return grids
