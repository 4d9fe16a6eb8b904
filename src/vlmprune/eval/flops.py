"""The accountant: analytic FLOPs of a prefill, priced from what actually ran (`RunStats`) or from a plan.

Everything is counted as multiply-adds (MACs) of the matrix products; FLOPs = 2 x MACs, the convention
of `torch.utils.flop_counter.FlopCounterMode`, which these figures match within 3% on tiny models of
every family, pruned and unpruned (tests/eval/test_flops.py). Norms, activations, softmax, rotary
embeddings and residual adds are left out.

Language model, per decoder layer that runs over ``n`` tokens (hidden ``d``, ``H`` query and ``Hkv``
key/value heads of size ``hd``, SwiGLU width ``m``)::

    q, o projections      2 * n * d * H*hd
    k, v projections      2 * n * d * Hkv*hd      (grouped-query attention: Hkv <= H)
    scores  q k^T         n * n * H*hd            (the full n x n block, as sdpa and eager compute it)
    values  p v           n * n * H*hd
    SwiGLU MLP            3 * n * d * m

LM head: ``rows * d * vocab`` for the rows that reach it. Scoring overhead of in-model methods (FastV,
PDrop, SparseVLM read attention rows of layer i from its cache): per query row one q projection
``d * H*hd`` plus one row of scores ``keys * H*hd`` against the layer's keys. A method that computes
before the LLM (PAR's router) states its multiply-adds in ``Plan.overhead``; they count as scoring.
Vision-side methods (VisPruner, HoloV) state there the vision scores they read (`vision_score_macs`:
one q/k projection of one tower layer and its score rows) and their own similarity products.

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

Papers' convention (FastV, Chen et al. 2024, arXiv:2403.06764): a decoder layer over ``n``
tokens costs ``4*n*d^2 + 2*n^2*d + 2*n*d*m`` "FLOPs", summed over the layers run; reported as
``lm_tflops_fastv`` beside the exact counts. It is the multiply-add count of a layer with full
multi-head attention and a two-matrix MLP: about half of 2 x MACs, and not exact for GQA or SwiGLU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..counts import LMCounts, fastv_layer_flops, layer_macs, lm_share, prefill_flops, score_macs  # noqa: F401 (the LM side, re-exported)
from ..engine.plan import Plan
from ..engine.stats import RunStats
from ..errors import VlmpruneError

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


# ---------------------------------------------------------------------------------------- vision side
def _clip_image(config) -> tuple[int, int, int]:
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


def _llava_images(config, n_visual, pixel_values, image_sizes, image_grid_thw) -> list[tuple[int, int, int]]:
    tokens, tower, projector = _clip_image(config)
    if any(n % tokens for n in n_visual):
        raise VlmpruneError(f"LLaVA images give {tokens} visual tokens each; a sample has {n_visual} visual tokens")
    n_images = sum(n_visual) // tokens
    if pixel_values is not None and pixel_values.shape[0] != n_images:
        raise VlmpruneError(f"pixel_values holds {pixel_values.shape[0]} images but the prompts have {n_images}")
    return [(tokens, tower, projector)] * n_images


def _llava_next_images(config, n_visual, pixel_values, image_sizes, image_grid_thw) -> list[tuple[int, int, int]]:
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    if image_sizes is None:
        if sum(n_visual) == 0:
            return []
        raise VlmpruneError("pricing LLaVA-NeXT's vision tower needs image_sizes (pass the inputs: flops(pm, stats, **inputs))")
    per_tile, tower, projector = _clip_image(config)
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
    return _llava_next_images(config, [1], None, [[int(size[0]), int(size[1])]], None)[0][0]


def _window_sizes(vc, h: int, w: int) -> list[int]:
    """Qwen2.5-VL: patches in each attention window of one frame (windows of ``window_size`` pixels
    over the merged grid; edge windows hold what is left)."""
    merge = vc.spatial_merge_size
    size = vc.window_size // merge // vc.patch_size  # window side in merged tokens
    gh, gw = h // merge, w // merge
    rows = [min(size, gh - i) for i in range(0, gh, size)]
    cols = [min(size, gw - j) for j in range(0, gw, size)]
    return [r * c * merge * merge for r in rows for c in cols]


def _qwen_images(config, n_visual, pixel_values, image_sizes, image_grid_thw) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        if sum(n_visual) == 0:
            return []
        raise VlmpruneError(
            f"pricing the {config.model_type} vision tower needs image_grid_thw (pass the inputs: flops(pm, stats, **inputs))"
        )
    vc = config.vision_config
    qwen25 = config.model_type == "qwen2_5_vl"
    c = vc.hidden_size if qwen25 else vc.embed_dim
    merge = vc.spatial_merge_size
    out_dim = vc.out_hidden_size if qwen25 else vc.hidden_size
    out = []
    for t, h, w in torch.as_tensor(image_grid_thw).tolist():
        patches = t * h * w
        conv = patches * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * c
        full_attn = 2 * c * t * (h * w) ** 2  # attention within each frame
        if qwen25:
            mlp = 3 * patches * c * vc.intermediate_size
            window_attn = 2 * c * t * sum(s * s for s in _window_sizes(vc, h, w))
            attn = [full_attn if i in vc.fullatt_block_indexes else window_attn for i in range(vc.depth)]
        else:
            mlp = 2 * patches * c * int(c * vc.mlp_ratio)
            attn = [full_attn] * vc.depth
        tower = conv + sum(4 * patches * c * c + a + mlp for a in attn)
        merged, width = patches // merge**2, c * merge**2
        out.append((merged, tower, merged * (width * width + width * out_dim)))
    return out


VISION_PRICERS = {"llava": _llava_images, "llava_next": _llava_next_images, "qwen2_vl": _qwen_images, "qwen2_5_vl": _qwen_images}


def _by_sample(images: list[tuple], n_visual: Sequence[int]) -> torch.Tensor:
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


def vision_macs(config, n_visual: Sequence[int], pixel_values=None, image_sizes=None, image_grid_thw=None):
    """``[B]`` MACs of the vision tower and of the projector for each sample's images.

    Images are assigned to samples in order, by the visual tokens each gives the LLM."""
    images = VISION_PRICERS[config.model_type](config, list(n_visual), pixel_values, image_sizes, image_grid_thw)
    costs = _by_sample(images, n_visual)
    if not images:
        return costs.new_zeros(len(n_visual)), costs.new_zeros(len(n_visual))
    return costs[:, 0].clone(), costs[:, 1].clone()


def vision_score_macs(config, n_visual: Sequence[int], pixel_values=None, image_sizes=None, image_grid_thw=None):
    """``[B]`` MACs that ``PreparedInputs.vision_scores()`` spends on each sample's images (the adapters'
    ``_cls_scores`` / ``_received_scores``), for methods that state them in ``Plan.overhead``::

        CLIP (LLaVA-1.5, LLaVA-NeXT), per tile of N = P + 1 tokens, width c, in the scored layer:
            keys N*c^2 + the CLS query c^2 + its score row N*c
        Qwen2-VL / Qwen2.5-VL, per image of P patches, width c, in the last vision block:
            q, k, v 3*P*c^2 + every query against every key of its attention segment c*sum(segment^2)
            (the frame, or Qwen2.5-VL's windows when the last block is not a full-attention block)
    """
    images = VISION_PRICERS[config.model_type](config, list(n_visual), pixel_values, image_sizes, image_grid_thw)
    vc = config.vision_config
    if config.model_type.startswith("llava"):
        n, c = (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size
        per_tile = n * c * c + c * c + n * c
        _, clip_tower, _ = _clip_image(config)
        rows = [(tokens, tower // clip_tower * per_tile) for tokens, tower, _ in images]  # tower = tiles * clip_tower
    else:
        qwen25 = config.model_type == "qwen2_5_vl"
        c = vc.hidden_size if qwen25 else vc.embed_dim
        full = not qwen25 or (vc.depth - 1) in vc.fullatt_block_indexes
        rows = []
        for (tokens, _, _), (t, h, w) in zip(images, torch.as_tensor(image_grid_thw).tolist() if images else []):
            segments = [h * w] * t if full else [s for _ in range(t) for s in _window_sizes(vc, h, w)]
            rows.append((tokens, 3 * t * h * w * c * c + c * sum(s * s for s in segments)))
    costs = _by_sample(rows, n_visual)
    return costs[:, 0].clone() if rows else costs.new_zeros(len(n_visual))


# ---------------------------------------------------------------------------------------- the report
@dataclass
class FlopsReport:
    """FLOPs (= 2 x multiply-adds) of one prefill, per sample (``[B]`` float64 tensors).

    ``vision_tower``, ``projector``: the image side (zero, with ``vision_priced=False``, when asked not
    to price it). ``lm_prefill``: the decoder layers that ran over the tokens present at each depth.
    ``lm_head``: the rows that reached the LM head. ``scoring``: the attention-score rows in-model
    methods read (their q projections and score rows). ``lm_prefill_full``: every decoder layer over
    every prompt token, the unpruned reference of ``share``. ``lm_tflops_fastv``: the decoder layers
    run in FastV's convention (``4nd^2 + 2n^2d + 2ndm`` per layer), in TFLOPs.
    """

    vision_tower: torch.Tensor
    projector: torch.Tensor
    lm_prefill: torch.Tensor
    lm_head: torch.Tensor
    scoring: torch.Tensor
    lm_prefill_full: torch.Tensor
    lm_tflops_fastv: torch.Tensor
    vision_priced: bool = True

    @property
    def total(self) -> torch.Tensor:
        return self.vision_tower + self.projector + self.lm_prefill + self.lm_head + self.scoring

    @property
    def lm_tflops(self) -> torch.Tensor:
        """Exact LM prefill TFLOPs (decoder layers), beside `lm_tflops_fastv`."""
        return self.lm_prefill / 1e12

    @property
    def share(self) -> torch.Tensor:
        """``[B]`` the LM prefill cost (layers run + scoring) as a share of the unpruned prefill."""
        return (self.lm_prefill + self.scoring) / self.lm_prefill_full

    @property
    def batch_share(self) -> float:
        """`share` over the whole batch: total cost / total unpruned cost."""
        return float((self.lm_prefill + self.scoring).sum() / self.lm_prefill_full.sum())

    PARTS = ("vision_tower", "projector", "lm_prefill", "lm_head", "scoring", "lm_prefill_full")

    def macs(self) -> dict[str, torch.Tensor]:
        """The exact multiply-add counts of each part, ``[B]``."""
        return {name: getattr(self, name) / 2 for name in self.PARTS}

    def to_dict(self) -> dict:
        """Per-sample lists of FLOPs (JSON-ready)."""
        out = {name: getattr(self, name).tolist() for name in self.PARTS}
        out.update(total=self.total.tolist(), lm_tflops_fastv=self.lm_tflops_fastv.tolist(),
                   share=self.share.tolist(), vision_priced=self.vision_priced)
        return out

    def summary(self, sample: int = 0) -> str:
        g = lambda t: f"{float(t[sample]) / 1e9:.4g}"
        vision = f"vision tower {g(self.vision_tower)}, projector {g(self.projector)}, " if self.vision_priced else ""
        return (
            f"GFLOPs: {vision}LM prefill {g(self.lm_prefill)} (FastV convention {float(self.lm_tflops_fastv[sample]) * 1e3:.4g}), "
            f"scoring {g(self.scoring)}, LM head {g(self.lm_head)}, total {g(self.total)}; "
            f"LM prefill share {float(self.share[sample]):.3f} of unpruned"
        )


def _config_of(model: Any):
    config = getattr(model, "config", model)
    if not hasattr(config, "get_text_config") or getattr(config, "model_type", None) not in FAMILIES:
        raise VlmpruneError(
            f"flops() takes a vlmprune.PrunedModel, a transformers VLM or its config of a supported family "
            f"({', '.join(FAMILIES)}); got {type(model).__name__}"
        )
    return config


def _per_sample(value, batch: int, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [int(value)] * batch if isinstance(value, int) else [int(v) for v in value]
    if len(values) != batch:
        raise VlmpruneError(f"{name} has {len(values)} entries for a batch of {batch}")
    return values


def flops(
    model: Any,
    run: Any,
    *,
    n_text: int | Sequence[int] | None = None,
    n_visual: int | Sequence[int] | None = None,
    head_rows: int | Sequence[int] | None = None,
    vision: bool = True,
    **inputs: Any,
) -> FlopsReport:
    """Price a prefill analytically (see the module docstring for every formula).

        out = pm(**inputs, prune=vlmprune.FastV(layer=2, keep=0.25))
        report = vlmprune.flops(pm, out.stats, **inputs)   # report.total, report.share, report.lm_tflops_fastv

    `model`: a `PrunedModel`, a transformers VLM or its config. `run`: the `RunStats` of a run (or a
    result carrying ``.stats``) -- what actually ran, in-model choices and scoring included -- or a
    `Plan`, priced for prompts of `n_text` text and `n_visual` visual tokens (ints or one per sample;
    or pass ``input_ids`` / ``attention_mask``). `inputs`: the model inputs (``pixel_values``,
    ``image_sizes``, ``image_grid_thw``), which the vision tower's cost depends on; LLaVA-1.5 needs
    none (fixed-size images); a run whose images a method re-encoded (Downsample) prices the tower from
    what it ran on (``RunStats.vision_inputs``). ``vision=False`` prices the language model only. `head_rows`: LM-head
    rows (default: what the run computed; 1 per sample for a plan).
    """
    unknown = set(inputs) - set(INPUT_KEYS)
    if unknown:
        raise VlmpruneError(f"flops() got unexpected inputs {sorted(unknown)}; it takes {', '.join(INPUT_KEYS)}")
    config = _config_of(model)
    text_config = config.get_text_config()
    n_layers = text_config.num_hidden_layers
    run = getattr(run, "stats", run)
    if isinstance(run, RunStats):
        if n_text is not None or n_visual is not None:
            raise VlmpruneError("n_text / n_visual are read from the run's stats; give them only with a Plan")
        counts = LMCounts.from_stats(run)
        if head_rows is not None:
            counts.head_rows = torch.as_tensor(_per_sample(head_rows, counts.tokens.shape[0], "head_rows"))
    elif isinstance(run, Plan):
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is not None:
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            visual = (ids == config.image_token_id) & real
            n_visual, n_text = visual.sum(1).tolist(), (real & ~visual).sum(1).tolist()
        if n_text is None or n_visual is None:
            raise VlmpruneError("pricing a Plan needs the prompt: n_text and n_visual, or input_ids")
        batch = next((len(v) for v in (n_text, n_visual) if not isinstance(v, int)), run.batch_size or 1)
        counts = LMCounts.from_plan(
            run, _per_sample(n_text, batch, "n_text"), _per_sample(n_visual, batch, "n_visual"), n_layers,
            _per_sample(1 if head_rows is None else head_rows, batch, "head_rows"),
        )
    else:
        raise VlmpruneError(f"flops() prices a run's RunStats or a Plan, got {type(run).__name__}")
    if counts.tokens.shape[1] != n_layers:
        raise VlmpruneError(f"the run has {counts.tokens.shape[1]} decoder layers but the model has {n_layers}")

    lm = counts.macs(text_config)
    tower = projector = torch.zeros_like(lm["layers"])
    ran = run.vision_inputs if isinstance(run, RunStats) else None
    if vision and ran is not None:  # a method re-encoded the images (Downsample): price what the tower ran on
        tower, projector = vision_macs(config, ran["n_visual"], None, ran.get("image_sizes"), ran.get("image_grid_thw"))
    elif vision:
        tower, projector = vision_macs(
            config, counts.input_visual.tolist(), inputs.get("pixel_values"), inputs.get("image_sizes"),
            inputs.get("image_grid_thw"),
        )
    return FlopsReport(
        vision_tower=2 * tower,
        projector=2 * projector,
        lm_prefill=2 * lm["layers"],
        lm_head=2 * lm["head"],
        scoring=2 * lm["scoring"],
        lm_prefill_full=2 * lm["full"],
        lm_tflops_fastv=counts.fastv_flops(text_config) / 1e12,
        vision_priced=vision,
    )
