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

Vision tower and projector: each family's adapter prices them (``Adapter.vision_cost``; the formulas
are in `vlmprune.models.vision_cost`), as transformers runs them (every layer, whatever
``vision_feature_layer`` selects): CLIP tiles for LLaVA-1.5 / LLaVA-NeXT, every patch of each image
for Qwen2-VL / Qwen2.5-VL (attention within frames, or Qwen2.5-VL's windows).

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
from ..models import FAMILIES, family, find_family
from ..models.vision_cost import costs_by_sample as _by_sample, vision_score_macs  # noqa: F401 (re-exported)

INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


# ---------------------------------------------------------------------------------------- vision side
def vision_macs(config, n_visual: Sequence[int], pixel_values=None, image_sizes=None, image_grid_thw=None):
    """``[B]`` MACs of the vision tower and of the projector for each sample's images.

    Images are assigned to samples in order, by the visual tokens each gives the LLM."""
    cost = family(config.model_type).vision_cost
    images = cost.images(config, list(n_visual), pixel_values, image_sizes, image_grid_thw)
    costs = _by_sample(images, n_visual)
    if not images:
        return costs.new_zeros(len(n_visual)), costs.new_zeros(len(n_visual))
    return costs[:, 0].clone(), costs[:, 1].clone()


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
    if not hasattr(config, "get_text_config") or find_family(getattr(config, "model_type", None)) is None:
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
