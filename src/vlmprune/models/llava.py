"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expose ``model.model.get_image_features(...).pooler_output`` as one feature tensor per image;
LLaVA-NeXT's already contains the anyres tiles and image-newline tokens, so its visual-token count
varies per image. Positions are 1-D RoPE from the attention mask.
"""

from __future__ import annotations

import torch

from ..errors import VlmpruneError
from .base import Adapter, PreparedInputs


class LlavaAdapter(Adapter):
    families = ("llava", "llava_next")

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> PreparedInputs:
        mask = self._check_ids(input_ids, attention_mask)
        visual = input_ids == self.image_token_id
        embeds = self.decoder.embed_tokens(input_ids)
        features = None
        if pixel_values is not None:
            kwargs = {}
            if self.config.model_type == "llava_next":
                if image_sizes is None:
                    raise VlmpruneError("LLaVA-NeXT needs image_sizes (the processor returns it with pixel_values)")
                kwargs["image_sizes"] = image_sizes
            tower = self.model.model.vision_tower
            out = self.model.model.get_image_features(
                pixel_values=pixel_values.to(tower.dtype), return_dict=True, **kwargs
            )
            features = torch.cat(list(out.pooler_output), dim=0)
        embeds = self._scatter_visual(embeds, visual, features)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None]  # (1, B, L)
        return PreparedInputs(input_ids, embeds, positions, mask, visual, self._grids(visual))

    def _grids(self, visual: torch.Tensor) -> list:
        """LLaVA-1.5's visual tokens form one square grid per image; LLaVA-NeXT's tiles do not."""
        grids = []
        for n in visual.sum(1).tolist():
            side = int(round(n**0.5))
            grids.append((side, side) if self.config.model_type == "llava" and side * side == n and n else None)
        return grids
