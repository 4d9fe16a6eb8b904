"""vlmprune: physical token, layer and weight pruning for vision-language models.

    import vlmprune, torch
    pm = vlmprune.load("path/to/llava")                 # or vlmprune.wrap(hf_model)
    plan = vlmprune.Plan(keep={2: kept_idx}, skip=[5])  # kept_idx: LongTensor [batch, k]
    out = pm(input_ids=ids, pixel_values=pix, attention_mask=mask, prune=plan)
    ids = pm.generate(input_ids=ids, pixel_values=pix, prune=plan, max_new_tokens=20)
"""

from .engine.plan import Plan
from .errors import VlmpruneError
from .eval.flops import FlopsReport, flops
from .loading import load, wrap
from .methods import PAR, AtFlops, Compose, FastV, PDrop, Pool, Random, RandomLayers, ShortGPT, SparseVLM, StratifiedRandom, VisionZip, build_method
from .pruned_model import GenerationResult, PrunedModel, PrunedOutput

__version__ = "0.1.0"

__all__ = [
    "AtFlops", "FlopsReport", "flops",
    "Compose", "FastV", "PAR", "PDrop", "Pool", "Random", "RandomLayers", "ShortGPT", "SparseVLM", "StratifiedRandom", "VisionZip", "build_method",
    "GenerationResult", "Plan", "PrunedModel", "PrunedOutput", "VlmpruneError", "load", "wrap"]
