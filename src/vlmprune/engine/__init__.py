"""The engine: executes pruning decisions with real savings (see DESIGN.md)."""

from .cache import LayerwiseKVCache
from .plan import Plan
from .runner import LayerPolicy, PrefillResult, StageView, decode_step, prefill
from .sampling import SamplingConfig
from .sequence import TokenState
from .skips import SkippedLayers
from .stats import RunStats

__all__ = [
    "LayerwiseKVCache",
    "LayerPolicy",
    "Plan",
    "PrefillResult",
    "RunStats",
    "SamplingConfig",
    "SkippedLayers",
    "StageView",
    "TokenState",
    "decode_step",
    "prefill",
]
