"""Qwen2-VL and Qwen2.5-VL: 3-axis mRoPE positions from the model's own ``get_rope_index``.

``mm_token_type_ids`` (text 0, image 1, video 2) is always derived from ``input_ids`` here. Without it,
transformers' Qwen2.5-VL silently falls back to 1-D positions; a given one must agree with input_ids.

Vision scores (`PreparedInputs.vision_scores`): the tower has no CLS token, so a patch's dominance is
the mean attention it *receives* in the last vision block (mean over heads and over every query of
its attention segment: the image, or the window if that block is windowed). The vision pass records
the block's input and its segments and rotary tables; on demand q and k are projected from it and the
attention columns are summed in chunks of query rows. Keys are taken before the rotary embedding (so
similarity compares content, not position). The ``spatial_merge_size**2`` patches merged into one
LLM token (consecutive rows in the tower) give the token the mean of their scores and keys, and their
merger inputs concatenated as its features;
Qwen2.5-VL's window order is undone with the tower's own window index.
"""

from __future__ import annotations

import sys

import torch
from transformers.vision_utils import get_vision_window_index

from ..errors import VlmpruneError
from .base import Adapter, PreparedInputs, execution_device, onloaded
from .registry import register_family
from .vision_cost import Qwen25Cost, QwenCost

SCORE_BLOCK = 2**24  # attention probabilities materialised at once when summing columns (64 MiB in float32)


@register_family
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: the tower's blocks attend within each image."""

    model_type = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    label = "Qwen2-VL"
    vision_blocks = "model.visual.blocks"
    vision_cost = QwenCost()
    processor_class = "Qwen2VLProcessor"
    downsample = True
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
        features, record = None, None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise VlmpruneError("Qwen2-VL needs image_grid_thw (the processor returns it with pixel_values)")
            visual_model = self.model.model.visual
            with self._recording_input(visual_model.blocks[-1]) as seen, self._recording_input(visual_model.merger) as merged:
                out = self.model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            features = torch.cat(list(out.pooler_output), dim=0)
            record = lambda: self._received_scores(seen, merged, image_grid_thw)
        embeds = self._scatter_visual(embeds, visual, features)
        if image_grid_thw is not None:
            positions, _ = self.model.model.get_rope_index(
                input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=mask.long()
            )
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        images = {k: v for k, v in dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw).items() if v is not None}
        return PreparedInputs(input_ids, embeds, positions, mask, visual, self._grids(visual, image_grid_thw), record, images)

    @torch.no_grad()
    def _received_scores(self, seen: dict, merged: dict, image_grid_thw: torch.Tensor):
        """(dominance [N], keys [N, d], patch [N], features [N, merge**2 * D]) over the batch's visual
        tokens, from the recorded input ``[S, D]`` (S patches of all images) of the last vision block and
        the merger's input ``[S, D]``."""
        visual = self.model.model.visual
        block, attn = visual.blocks[-1], visual.blocks[-1].attn
        hidden_in = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
        cu_seqlens = seen["kwargs"]["cu_seqlens"].tolist()
        device = execution_device(block, hidden_in.device)  # the inputs were recorded before a hook moved them
        cos, sin = (t.to(device) for t in seen["kwargs"]["position_embeddings"])
        with onloaded(block.norm1, attn.qkv):
            x = block.norm1(hidden_in.to(device))
            n_patches = x.shape[0]
            qkv = attn.qkv(x).view(n_patches, 3, attn.num_heads, attn.head_dim)  # (S, 3, H, d)
        keys = qkv[:, 1].float().mean(1)  # (S, d) before the rotary embedding
        # the family's own vision RoPE, from the attention module's source module
        apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = apply_rope(qkv[:, 0], qkv[:, 1], cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, d)
        received = torch.zeros(n_patches, device=q.device)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            k_seg = k[:, start:end]  # (H, n, d)
            chunk = max(1, SCORE_BLOCK // (attn.num_heads * (end - start)))  # query rows per block
            for r0 in range(start, end, chunk):
                r1 = min(end, r0 + chunk)
                probs = torch.softmax(q[:, r0:r1] @ k_seg.transpose(1, 2) * attn.scaling, dim=-1)  # (H, r, n)
                received[start:end] += probs.sum((0, 1))
            received[start:end] /= attn.num_heads * (end - start)
        unit = visual.spatial_merge_size**2  # consecutive patches merged into one LLM token
        dominance = received.view(-1, unit).mean(1)
        keys = keys.view(-1, unit, keys.shape[-1]).mean(1)
        merger_in = merged["args"][0] if merged["args"] else next(iter(merged["kwargs"].values()))
        features = merger_in.to(dominance.device).float().reshape(dominance.shape[0], -1)  # (N, unit * D)
        order = self._image_order(image_grid_thw, dominance.device)
        if order is not None:
            dominance, keys, features = dominance[order], keys[order], features[order]
        return dominance, keys, torch.ones_like(dominance, dtype=torch.bool), features

    def _image_order(self, image_grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The permutation from the tower's token order to the images' (None: the same order)."""
        return None

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


@register_family
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: windowed attention outside ``fullatt_block_indexes``, blocks run in window order."""

    model_type = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    label = "Qwen2.5-VL"
    vision_cost = Qwen25Cost()
    processor_class = "Qwen2_5_VLProcessor"

    def _image_order(self, image_grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Blocks run in window order; tokens leave in image order (the tower's own window index)."""
        vcfg = self.config.vision_config
        window_index, _ = get_vision_window_index(image_grid_thw, vcfg.spatial_merge_size, vcfg.window_size, vcfg.patch_size)
        return torch.argsort(window_index.to(device))
