"""What a pruning method can do, as `typing.Protocol` classes: vlmprune asks ``isinstance(m, Cap)``
of these instead of probing for attributes, and a method implements the ones it needs.

* `Method` (every method): ``decide(pm, prep) -> (Plan, [LayerPolicy])``: a plan for what it decides
  before the LLM, and the policies the engine calls inside it (`engine.runner`).
* `Schedules` (methods that decide inside the LLM): ``schedule(sample, n_layers) -> Schedule``, its
  token counts per layer, so a FLOPs budget prices it without running the model (`methods.budget`).
* `PricesItself`: ``lm_counts(pm, prep) -> LMCounts``, its whole cost as counts (PAR: the router's
  choice does not change its cost).
* `Calibrates`: ``calibrate(pm, batches) -> method``, the method with what it learnt from data (ShortGPT).
* `Reencodes`: ``reencode`` (Downsample: the vision tower runs again on a smaller image).
* `HasLayerFloor`: ``min_layers(pm)``, the fewest layers its layer budget can keep.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Method(Protocol):
    def decide(self, pm: Any, prep: Any) -> tuple[Any, list]: ...


@runtime_checkable
class Schedules(Protocol):
    def schedule(self, sample: Any, n_layers: int) -> Any: ...


@runtime_checkable
class PricesItself(Protocol):
    def lm_counts(self, pm: Any, prep: Any) -> Any: ...


@runtime_checkable
class Calibrates(Protocol):
    def calibrate(self, pm: Any, batches: Any) -> Any: ...


@runtime_checkable
class Reencodes(Protocol):
    def reencode(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class HasLayerFloor(Protocol):
    def min_layers(self, pm: Any) -> int: ...
