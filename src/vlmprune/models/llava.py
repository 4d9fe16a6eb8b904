"""LLaVA-1.5 (`LlavaForConditionalGeneration`) and LLaVA-NeXT (`LlavaNextForConditionalGeneration`).

Both expose ``model.model.get_image_features(...).pooler_output`` as one feature tensor per image;
LLaVA-NeXT's already contains the anyres tiles and image-newline tokens, so its visual-token count
varies per image. Positions are 1-D RoPE from the attention mask.

Vision scores (`PreparedInputs.vision_scores`): the vision pass records the input of the CLIP layer
that produces the features ``vision_feature_layer`` selects (for a list of layers, the last listed);
on demand the CLS query row and all keys are projected from it; the projector's input (the selected
features, before the projector) is recorded too. Per-patch values reach the visual-token
order through the model's own layout (LLaVA-NeXT: ``pack_image_features``, tiles + unpadding +
newlines), so nothing about the layout is re-implemented here.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import VlmpruneError
from .base import Adapter, PreparedInputs, execution_device, onloaded
from .registry import register_family
from .vision_cost import ClipCost, LlavaNextCost

# vision towers whose first token is a CLS token that attends to every patch (config.vision_config.model_type)
CLS_TOWERS = ("clip_vision_model",)


@register_family
class LlavaAdapter(Adapter):
    """LLaVA-1.5: one CLIP tile per image, its visual tokens one square grid."""

    model_type = "llava"
    model_class = "LlavaForConditionalGeneration"
    label = "LLaVA-1.5"
    vision_blocks = "model.vision_tower.encoder.layers"
    vision_cost = ClipCost()
    fixed_resolution = True

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
        features, record = None, None
        if pixel_values is not None:
            kwargs = self._image_kwargs(image_sizes)
            tower = self.model.model.vision_tower
            layer_idx, why_not = self._scored_layer()
            recording = self._recording_input(tower.encoder.layers[layer_idx]) if why_not is None else nullcontext({})
            with recording as seen, self._recording_input(self.model.model.multi_modal_projector) as projected:
                out = self.model.model.get_image_features(
                    pixel_values=pixel_values.to(tower.dtype), return_dict=True, **kwargs
                )
            features = torch.cat(list(out.pooler_output), dim=0)
            record = lambda: self._cls_scores(layer_idx, why_not, seen, projected, image_sizes)
        embeds = self._scatter_visual(embeds, visual, features)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None]  # (1, B, L)
        images = {k: v for k, v in dict(pixel_values=pixel_values, image_sizes=image_sizes).items() if v is not None}
        return PreparedInputs(input_ids, embeds, positions, mask, visual, self._grids(visual), record, images)

    def _image_kwargs(self, image_sizes: torch.Tensor | None) -> dict:
        """The keywords of ``get_image_features`` beside the pixels (LLaVA-1.5: none)."""
        return {}

    # ------------------------------------------------------------------ vision scores
    def _scored_layer(self) -> tuple[int, str | None]:
        """The tower layer whose output is the hidden state ``vision_feature_layer`` selects (hidden
        state 0 is the embeddings, hidden state i the output of layer i-1), or why there is none."""
        tower_type = self.config.vision_config.model_type
        if tower_type not in CLS_TOWERS:
            return 0, f"vision scores need a CLS token; this model's vision tower ({tower_type}) has none"
        selected = self.config.vision_feature_layer
        selected = selected[-1] if isinstance(selected, (list, tuple)) else selected
        hidden_idx = selected % (self.config.vision_config.num_hidden_layers + 1)
        if hidden_idx == 0:
            return 0, f"vision_feature_layer={selected} selects the patch embeddings, which no attention layer makes"
        return hidden_idx - 1, None

    @torch.no_grad()
    def _cls_scores(self, layer_idx: int, why_not: str | None, seen: dict, projected: dict, image_sizes: torch.Tensor | None):
        """(dominance [N], keys [N, d], patch [N], features [N, f]) over the batch's visual tokens, from the
        recorded input ``[tiles, 1 + P, D]`` of CLIP layer `layer_idx` and the projector's input
        ``[tiles, P (+1 with the "full" strategy), f]``."""
        if why_not is not None:
            raise VlmpruneError(why_not)
        hidden_in = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
        layer = self.model.model.vision_tower.encoder.layers[layer_idx]
        attn = layer.self_attn
        hidden_in = hidden_in.to(execution_device(layer, hidden_in.device))  # recorded before a hook moved it
        with onloaded(layer.layer_norm1, attn.q_proj, attn.k_proj):
            x = layer.layer_norm1(hidden_in)
            tiles, seq, _ = x.shape
            # the CLS query row against every key, as the layer's attention computes them
            q = attn.q_proj(x[:, :1]).view(tiles, 1, -1, attn.head_dim).transpose(1, 2).float()  # (T, H, 1, d)
            k = attn.k_proj(x).view(tiles, seq, -1, attn.head_dim).transpose(1, 2).float()  # (T, H, S, d)
        cls_row = torch.softmax(q @ k.transpose(2, 3) * attn.scale, dim=-1)  # (T, H, 1, S)
        dominance = cls_row.mean(1)[:, 0]  # (T, S)
        keys = k.mean(1)  # (T, S, d)
        # channel 0 flags a real patch: the newline tokens the packing inserts get the zero vector
        values = torch.cat([torch.ones_like(dominance)[..., None], dominance[..., None], keys], dim=-1)
        if self.config.vision_feature_select_strategy == "default":  # "full" passes CLS on, scored by itself
            values = values[:, 1:]
        # the projector's input rows are the selected tokens, in the same (tile, token) order
        selected = projected["args"][0] if projected["args"] else next(iter(projected["kwargs"].values()))
        values = torch.cat([values, selected.to(values.device).float()], dim=-1)
        per_token = self._per_token(values, image_sizes)
        width = keys.shape[-1]
        return per_token[:, 1], per_token[:, 2 : 2 + width], per_token[:, 0] > 0, per_token[:, 2 + width :]

    def _per_token(self, values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """``[tiles, tokens, v]`` per-patch values as ``[N, v]`` in visual-token order (LLaVA-1.5: one
        tile per image, its tokens in order)."""
        return values.reshape(-1, values.shape[-1])

    def _grids(self, visual: torch.Tensor) -> list:
        """LLaVA-1.5's visual tokens form one square grid per image."""
        grids = []
        for n in visual.sum(1).tolist():
            side = int(round(n**0.5))
            grids.append((side, side) if side * side == n and n else None)
        return grids


@register_family
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: anyres CLIP tiles per image, unpadded, a newline token ending each row."""

    model_type = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    label = "LLaVA-NeXT"
    vision_cost = LlavaNextCost()
    downsample = True
    fixed_resolution = False

    def _image_kwargs(self, image_sizes: torch.Tensor | None) -> dict:
        if image_sizes is None:
            raise VlmpruneError("LLaVA-NeXT needs image_sizes (the processor returns it with pixel_values)")
        return {"image_sizes": image_sizes}

    def _per_token(self, values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
        """The tiles' values packed by the model's own layout (tiles + unpadding + newlines; a newline
        token gets the zero vector)."""
        n_tiles = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]
        packed, _ = self.model.model.pack_image_features(
            list(values.split(n_tiles)),
            image_sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=values.new_zeros(values.shape[-1]),
        )
        return torch.cat(packed, dim=0)

    def _grids(self, visual: torch.Tensor) -> list:
        """LLaVA-NeXT's tiles and newlines form no single grid."""
        return [None] * visual.shape[0]
