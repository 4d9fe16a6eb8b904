"""Image downsampling to a visual-token budget: each image re-processed at a lower resolution before
the vision tower, so the tower and the LLM see fewer patches / tiles (the baseline every token
method is compared with at equal tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...counts import LMCounts
from ...errors import VlmpruneError
from ...models import FAMILIES as MODEL_FAMILIES
from ...models.vision_cost import llava_next_tokens
from ..base import check_keep, keep_count, opt
from ..registry import register_method

IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


# ------------------------------------------------------------------ resolutions
def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` resampled to `size` (height, width): bicubic, antialiased when shrinking, float32."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    return F.interpolate(image[None].float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)[0]


def _pick(candidates: dict, target: float, aspect: float):
    """The candidate resolution whose token count is closest to `target` (ties: fewer tokens, then the
    aspect ratio closest to `aspect`, then the larger image). `candidates`: {(height, width): tokens}."""
    return min(candidates, key=lambda s: (abs(candidates[s] - target), candidates[s],
                                           abs(math.log(s[0] / s[1] / aspect)), -s[0] * s[1]))


def _qwen_pixel_range(pm) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the checkpoint's image processor, else transformers' defaults."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    size = getattr(getattr(pm.processor, "image_processor", None), "size", None) or Qwen2VLImageProcessorPil.size
    read = lambda key: size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    default = Qwen2VLImageProcessorPil.size
    return int(read("shortest_edge") or default["shortest_edge"]), int(read("longest_edge") or default["longest_edge"])


def qwen_resolution(config, pixel_range: tuple[int, int], grid: tuple[int, int], target: float) -> tuple[int, int]:
    """The lower resolution (height, width in pixels, multiples of ``patch * merge``) for an image of
    `grid` (h, w) patches and a target of `target` visual tokens: among the sizes the processor's own
    ``smart_resize`` makes of the image scaled to 1, 2, ... merged rows or columns (no side larger than
    now), the one whose tokens are closest to `target` (`_pick`). A processor call on the image resized
    to it gives the same grid (it is a fixed point of ``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = grid
    height, width = h * vc.patch_size, w * vc.patch_size
    scales = {1.0} | {a * factor / height for a in range(1, height // factor + 1)}
    scales |= {b * factor / width for b in range(1, width // factor + 1)}
    candidates = {}
    for s in scales:
        try:
            hh, ww = smart_resize(max(1, round(height * s)), max(1, round(width * s)), factor, *pixel_range)
        except ValueError:  # an aspect ratio the processor refuses
            continue
        if hh <= height and ww <= width:
            candidates[(hh, ww)] = hh * ww // factor**2
    return _pick(candidates, target, height / width)


def llava_next_resolution(config, size: tuple[int, int], target: float) -> tuple[int, int]:
    """The lower image size (height, width) for an image of `size` and a target of `target` visual
    tokens. LLaVA-NeXT's tokens depend on which anyres resolution (``image_grid_pinpoints``) the size
    selects; the candidates are the size itself and, for each pinpoint it does not fit, the largest
    scaled-down size that fits it (``floor(side * min(ph / H, pw / W))``); the one whose tokens are
    closest to `target` wins (`_pick`)."""
    height, width = size
    scales = {1.0} | {min(ph / height, pw / width) for ph, pw in config.image_grid_pinpoints}
    candidates = {}
    for s in scales:
        if s <= 1:
            hh, ww = max(1, math.floor(height * s)), max(1, math.floor(width * s))
            candidates[(hh, ww)] = llava_next_tokens(config, (hh, ww))
    return _pick(candidates, target, height / width)


# ------------------------------------------------------------------ pixels
def qwen_pixels(config, rows: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """One image's processor rows ``[h*w, C*tp*p*p]`` (patches in merge-unit order, each ``(C, tp, p,
    p)``, the processor's ``patchify``) re-made at `new_grid` (h', w') patches: the image is put back
    together, resampled (`_resize`) and cut again the same way."""
    vc = config.vision_config
    p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    (h, w), (h2, w2) = grid, new_grid
    channels = rows.shape[1] // (tp * p * p)
    patches = rows.view(h // m, w // m, m, m, channels, tp, p, p)[:, :, :, :, :, 0]  # an image repeats its frame
    image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * p, w * p)  # (C, H, W)
    image = _resize(image, (h2 * p, w2 * p))
    patches = image.reshape(channels, h2 // m, m, p, w2 // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p)
    patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)
    return patches.reshape(h2 * w2, channels * tp * p * p).to(rows.dtype)


def _pad_value(pm, channels: int) -> torch.Tensor:
    """``[C, 1, 1]`` black after the processor's normalisation, ``(0 - mean) / std``: what LLaVA-NeXT's
    processor pads the anyres canvas with (its image mean and std, else CLIP's, the checkpoints')."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    processor = getattr(pm.processor, "image_processor", None)
    mean = getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN
    std = getattr(processor, "image_std", None) or OPENAI_CLIP_STD
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    return (-mean / std).view(channels, 1, 1)


def _fitted(size: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(size inside `target` keeping the aspect ratio, its (top, left) offset): transformers'
    ``get_patch_output_size`` and the processor's centred padding."""
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension

    shape = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, *size))  # only its shape is read
    fit = get_patch_output_size(shape, target, input_data_format=ChannelDimension.FIRST)
    return fit, ((target[0] - fit[0]) // 2, (target[1] - fit[1]) // 2)


def llava_next_pixels(config, tiles: torch.Tensor, size: tuple[int, int], new_size: tuple[int, int],
                      pad: torch.Tensor) -> torch.Tensor:
    """One image's tiles ``[T, C, S, S]`` (the base image, then the anyres grid in row-major order) re-made
    for an image of `new_size`: the image is read back from the grid (the canvas of the selected
    resolution without its padding), resampled to `new_size` (`_resize`), then tiled as the processor
    tiles an image of that size (fitted into its selected resolution, padded with `pad`, cut in tiles
    of S, after the base image resized to S x S)."""
    from transformers.image_processing_utils import select_best_resolution

    side = config.vision_config.image_size
    channels = tiles.shape[1]
    pinpoints = config.image_grid_pinpoints
    best = select_best_resolution(tuple(size), pinpoints)
    rows, cols = best[0] // side, best[1] // side
    canvas = tiles[1 : 1 + rows * cols].reshape(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4)
    canvas = canvas.reshape(channels, best[0], best[1])
    (fh, fw), (top, left) = _fitted(size, best)
    image = _resize(canvas[:, top : top + fh, left : left + fw], new_size)  # the image at the lower resolution
    best = select_best_resolution(tuple(new_size), pinpoints)
    rows, cols = best[0] // side, best[1] // side
    (fh, fw), (top, left) = _fitted(new_size, best)
    canvas = pad.expand(channels, best[0], best[1]).clone()
    canvas[:, top : top + fh, left : left + fw] = _resize(image, (fh, fw))
    grid = canvas.reshape(channels, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(rows * cols, channels, side, side)
    return torch.cat([_resize(image, (side, side))[None], grid]).to(tiles.dtype)


# ------------------------------------------------------------------ prompts
def _rebuild_ids(input_ids, mask, image_token_id, old, new):
    """The prompts with each image's run of placeholders resized from ``old[i]`` to ``new[i]`` tokens
    (images in order, assigned to samples by their tokens), padded again on the side they were."""
    rows, it = [], iter(zip(old, new))
    for b in range(input_ids.shape[0]):
        real = input_ids[b][mask[b]]
        places = (real == image_token_id).nonzero().squeeze(1).tolist()
        pieces, cursor, taken = [], 0, 0
        while taken < len(places):
            n_old, n_new = next(it)
            run = places[taken : taken + n_old]
            if run[-1] - run[0] != n_old - 1:
                raise VlmpruneError(f"sample {b}: an image's {n_old} placeholder tokens are not one run; "
                                    "build the prompt with the model's processor")
            pieces += [real[cursor : run[0]], real.new_full((n_new,), image_token_id)]
            cursor, taken = run[-1] + 1, taken + n_old
        rows.append(torch.cat(pieces + [real[cursor:]]))
    length = max(r.numel() for r in rows)
    left = bool((~mask[:, 0]).any())
    pad = int(input_ids[~mask][0]) if bool((~mask).any()) else 0
    ids = input_ids.new_full((len(rows), length), pad)
    new_mask = torch.zeros(len(rows), length, dtype=torch.bool, device=mask.device)
    for b, row in enumerate(rows):
        where = slice(length - row.numel(), length) if left else slice(0, row.numel())
        ids[b, where], new_mask[b, where] = row, True
    return ids, new_mask


@register_method("downsample", kind="before", budget="keep")
@dataclass(frozen=True)
class Downsample:
    """Re-process each image at the lower resolution that gives `keep` (ratio or count of each sample's
    visual tokens) as closely as the family allows, before the vision tower: the tower, the projector
    and the LLM all run on fewer patches, and the tower is priced at its smaller cost.

        pm(**inputs, prune=vlmprune.methods.Downsample(keep=0.25))               # Qwen2-VL, LLaVA-NeXT
        pm(**inputs, prune=[vlmprune.methods.Downsample(keep=0.5), shortgpt])    # with a layer method
        pm(**inputs, prune=vlmprune.AtFlops(vlmprune.methods.Downsample(), share=0.4))

    It changes the model's inputs, not the tokens after the tower: `PrunedModel` calls
    ``reencode(pm, inputs)`` before `prepare` (alone, in a list / `Compose`, or as the method of an
    `AtFlops`, whose budget is then priced on the caller's inputs by `lm_counts`, without running the
    tower). The re-encoded inputs are what a processor call on the image at the lower resolution gives
    with the same prompt: fewer image placeholders, Qwen's ``image_grid_thw`` (and so its mRoPE
    positions) or LLaVA-NeXT's ``image_sizes`` and tiles of the smaller image. ``out.inputs`` holds
    them (the logits rows and ``token_index`` refer to their ``input_ids``); ``generate`` returns the
    caller's prompt followed by the new tokens. The run's stats keep the caller's visual-token count as
    ``input_visual`` (so shares are of the unpruned model) and the tower's geometry as ``vision_inputs``
    (`vlmprune.flops` prices the tower from it).

    Per sample with budget ``k`` of ``n`` visual tokens, every image of the sample aims at ``k / n`` of
    its own tokens. Qwen2-VL / Qwen2.5-VL (`qwen_resolution`): the image, as its ``h x w`` patches,
    scaled so that it has 1, 2, ... merged rows or columns, through the processor's ``smart_resize``
    (its ``min_pixels`` / ``max_pixels``: the checkpoint processor's, else transformers' defaults);
    the size whose tokens are closest to the target wins (ties: fewer tokens, then the aspect ratio
    closest to the image's). LLaVA-NeXT (`llava_next_resolution`): its tokens move only with the anyres
    resolution the image size selects, so the candidates are the largest sizes that select each
    ``image_grid_pinpoints`` entry; the base tile and at least the smallest pinpoint's tiles always
    remain, so budgets below them give that minimum. The run's stats say what was reached.

    LLaVA-1.5 is refused: it takes every image at one fixed resolution (``vision_config.image_size``),
    so a lower resolution never makes fewer tokens; its equivalent is `pool` (2-D average pooling of
    the token grid, `Pool`), which keeps the tower's full cost.

    Pixels: re-made from the caller's ``pixel_values`` (no original image is needed). Qwen: the
    processor's patches are put back into the image, which is resampled with bicubic interpolation
    (antialiased) and cut into patches again. LLaVA-NeXT: the image is read back from the anyres grid
    tiles (the canvas without its padding), resampled to the lower size, and tiled again as the
    processor tiles an image of that size (fitted, padded with normalised black, base tile first).
    Differences from a processor call on the original image resized: the resampling runs on the
    normalised pixels in float32 with torch's bicubic (the processor resizes the 8-bit image with PIL's
    and clips), and starts from the processed image (Qwen: already resized by ``smart_resize``;
    LLaVA-NeXT: the grid's resolution, which may be below the original's), so pixel values differ
    slightly; token counts, grids, positions and the tower's FLOPs are the same. The resampling itself
    is not priced (no matrix products). An image whose resolution does not change (e.g. ``keep=1.0``)
    passes through untouched, so keeping everything is the unpruned model exactly. Video inputs are not
    supported.
    """

    keep: float | int = opt(
        0.25, "visual tokens aimed at: a share in (0, 1] of each sample's, or a count (the lower resolution that comes closest)"
    )

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def decide(self, pm, prep):
        raise VlmpruneError(
            "downsample re-encodes the images before the vision tower, so it cannot decide on prepared inputs; "
            "pass it as prune= to pm(...), pm.generate(...) or pm.score_response(...) (alone, in a list with "
            "other methods, or in AtFlops)"
        )

    # ------------------------------------------------------------------ the plan, as counts
    def _images(self, pm, input_ids, mask, image_inputs) -> list[dict]:
        """Per image, in order: its sample, its tokens now, its size now and at the lower resolution, and
        its tokens then."""
        family, entry = pm.config.model_type, type(pm.adapter)
        if not entry.downsample:
            able = [f for f in MODEL_FAMILIES.values() if f.downsample]
            if entry.fixed_resolution:
                raise VlmpruneError(
                    f"downsample cannot lower {entry.label}'s visual tokens: it takes every image at one fixed "
                    f"resolution ({pm.config.vision_config.image_size} px, always the same token count); its "
                    "equivalent is pool (vlmprune.Pool(keep=...), 2-D average pooling of the token grid), or use "
                    f"{' / '.join(f.label for f in able)}, whose token count follows the image size"
                )
            raise VlmpruneError(f"downsample supports {', '.join(f.model_type for f in able)}, not {family}")
        visual = (input_ids == pm.adapter.image_token_id) & mask
        counts = visual.sum(1).tolist()
        if not sum(counts):
            return []
        vc = pm.config.vision_config
        if family == "llava_next":
            sizes = image_inputs.get("image_sizes")
            if sizes is None:
                raise VlmpruneError("downsample needs LLaVA-NeXT's image_sizes (the processor returns them with pixel_values)")
            sizes = [tuple(s) for s in torch.as_tensor(sizes).tolist()]
            tokens = [llava_next_tokens(pm.config, s) for s in sizes]
        else:
            grids = image_inputs.get("image_grid_thw")
            if grids is None:
                raise VlmpruneError("downsample needs Qwen's image_grid_thw (the processor returns it with pixel_values)")
            grids = torch.as_tensor(grids).tolist()
            if any(t != 1 for t, _, _ in grids):
                raise VlmpruneError("downsample re-encodes images only; video inputs are not supported")
            sizes = [(h, w) for _, h, w in grids]
            tokens = [h * w // vc.spatial_merge_size**2 for h, w in sizes]
            pixel_range = _qwen_pixel_range(pm)
        images, it = [], iter(zip(sizes, tokens))
        for b, n in enumerate(counts):
            share, taken = keep_count(self.keep, n) / n if n else 0.0, 0
            while taken < n:
                size, now = next(it, (None, 0))
                if size is None:
                    raise VlmpruneError(f"the image inputs run out before sample {b}'s {n} visual tokens")
                if family == "llava_next":
                    new = llava_next_resolution(pm.config, size, share * now)
                    then = llava_next_tokens(pm.config, new)
                else:
                    hh, ww = qwen_resolution(pm.config, pixel_range, size, share * now)
                    new = (hh // vc.patch_size, ww // vc.patch_size)
                    then = new[0] * new[1] // vc.spatial_merge_size**2
                images.append(dict(sample=b, tokens=now, size=size, new_size=new, new_tokens=then))
                taken += now
            if taken != n:
                raise VlmpruneError(f"the image inputs give sample {b} {taken} visual tokens but its prompt has {n}")
        if next(it, None) is not None:
            raise VlmpruneError("the image inputs hold more images than the prompts' image placeholders")
        return images

    def lm_counts(self, pm, prep) -> LMCounts:
        """The language model's work on the re-encoded inputs, priced against the caller's prompt, from
        the image geometry alone (no vision pass): what a FLOPs budget (`AtFlops`) searches. `prep`: a
        `PreparedInputs` or the caller's `pruned_model.ModelInputs` (``input_ids``, ``attention_mask``,
        ``image_inputs``)."""
        mask = prep.attention_mask.bool()
        images = self._images(pm, prep.input_ids, mask, prep.image_inputs)
        n_visual = ((prep.input_ids == pm.adapter.image_token_id) & mask).sum(1).tolist()
        n_text = [int(m) - v for m, v in zip(mask.sum(1).tolist(), n_visual)]
        new = [0] * len(n_visual)
        for image in images:
            new[image["sample"]] += image["new_tokens"]
        return LMCounts.from_schedule(n_text, n_visual, pm.n_layers, [{0: k} for k in new])

    # ------------------------------------------------------------------ the re-encoded inputs
    def reencode(self, pm, inputs: dict) -> dict:
        """The model inputs with every image re-processed at its lower resolution (see the class)."""
        input_ids = inputs["input_ids"]
        given = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if given is None else given.bool()
        images = self._images(pm, input_ids, mask, {k: inputs.get(k) for k in IMAGE_KEYS})
        if all(tuple(im["new_size"]) == tuple(im["size"]) for im in images):
            return inputs  # every image keeps its resolution (e.g. keep=1.0): nothing to re-encode
        pixels = inputs["pixel_values"]
        out = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}  # the adapter derives it from input_ids
        if pm.config.model_type == "llava_next":
            pad = _pad_value(pm, pixels.shape[2])
            tiles = [llava_next_pixels(pm.config, pixels[i], im["size"], im["new_size"], pad.to(pixels.device))
                     for i, im in enumerate(images)]
            batch = pixels.new_zeros(len(tiles), max(t.shape[0] for t in tiles), *pixels.shape[2:])
            for i, t in enumerate(tiles):
                batch[i, : t.shape[0]] = t
            sizes = inputs["image_sizes"]
            out.update(pixel_values=batch, image_sizes=torch.as_tensor([im["new_size"] for im in images]).to(sizes))
        else:
            starts = np.cumsum([0] + [h * w for h, w in (im["size"] for im in images)])
            rows = [pixels[starts[i] : starts[i + 1]] if tuple(im["new_size"]) == tuple(im["size"])  # an image left as it is
                    else qwen_pixels(pm.config, pixels[starts[i] : starts[i + 1]], im["size"], im["new_size"])
                    for i, im in enumerate(images)]
            grid = inputs["image_grid_thw"]
            out.update(pixel_values=torch.cat(rows),
                       image_grid_thw=torch.as_tensor([[1, *im["new_size"]] for im in images]).to(grid))
        ids, new_mask = _rebuild_ids(input_ids, mask, pm.adapter.image_token_id,
                                     [im["tokens"] for im in images], [im["new_tokens"] for im in images])
        out.update(input_ids=ids, attention_mask=new_mask.to(given.dtype) if given is not None else new_mask.long())
        return out
