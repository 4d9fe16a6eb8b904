"""FLOPs budgets: run a method at the budget whose priced FLOPs come closest to a share of the full model's.

    pm(**inputs, prune=vlmprune.AtFlops(vlmprune.FastV(layer=2), share=0.5))
    pm(**inputs, prune=vlmprune.AtFlops(vlmprune.ShortGPT().calibrate(pm, batches), share=0.5))

The share is of the language model's prefill: the decoder layers run over the tokens present at each
depth plus the method's attention-scoring overhead, over every layer run over every prompt token
(`eval.flops`; the vision tower, projector and LM head are the same with and without a token or
layer method, and left out). For each batch, the method's budget field (``keep`` for token methods,
searched over ratios ``k / n_visual`` -- every token count --, ``keep_layers`` for layer methods, every
layer count) is set to the candidate whose analytically priced share is closest to the target.

Pricing a candidate never runs the model: a method that decides inside the LLM gives its token
schedule as counts (``schedule(sample, n_layers)``, FastV / PDrop / SparseVLM); a method may price
itself (``lm_counts(pm, prep) -> LMCounts``, PAR: its cost does not depend on which tokens or layers
its router picks, so no routing pass runs per candidate); any other method's plan is decided
(before the LLM, no decoder layer runs) and priced. The priced share grows with the
budget (more tokens or layers never cost less), so a search over the candidates (`first_reaching`) finds the closest
one. The run's own accounting reports the share achieved: ``vlmprune.flops(pm, out.stats).share``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..counts import LMCounts, lm_share
from ..errors import VlmpruneError
from .base import SampleShape
from .protocols import HasLayerFloor, Method, PricesItself, Schedules
from .registry import BUDGETS

def budget_field(method_cls: type) -> str:
    """The field a FLOPs budget searches on a method class: its registered ``budget`` (`register_method`),
    else ``keep`` or ``keep_layers``, whichever of the two it has."""
    registered = getattr(method_cls, "budget", None)
    if isinstance(registered, str):
        return registered
    names = {f.name for f in dataclasses.fields(method_cls)} if dataclasses.is_dataclass(method_cls) else set()
    found = [k for k in BUDGETS if k in names]
    if len(found) != 1:
        raise VlmpruneError(
            f"{method_cls.__name__} has {'both' if found else 'neither'} of the budget fields {BUDGETS}; "
            "name the one to search with AtFlops(..., knob=...)"
        )
    return found[0]


def sample_shapes(prep) -> list[SampleShape]:
    """Each sample's text tokens, visual tokens and text tokens after its first visual token."""
    real, visual = prep.attention_mask, prep.visual_mask & prep.attention_mask
    t = torch.arange(real.shape[1], device=real.device)
    first = torch.where(visual, t, real.shape[1]).amin(1, keepdim=True)
    after = (real & ~visual & (t > first)).sum(1)
    text = (real & ~visual).sum(1)
    return [SampleShape(*row) for row in zip(text.tolist(), visual.sum(1).tolist(), after.tolist())]


def method_counts(method: Any, pm, prep, shapes: list[SampleShape] | None = None) -> LMCounts:
    """The language model's work under `method` for a prepared batch, as counts, without running the
    model (`shapes`: the batch's `sample_shapes`, when the caller has them)."""
    if isinstance(method, PricesItself):  # the method prices itself (e.g. PAR, without a routing pass)
        return method.lm_counts(pm, prep)
    shapes = sample_shapes(prep) if shapes is None else shapes
    n_text, n_visual = [s.n_text for s in shapes], [s.n_visual for s in shapes]
    if isinstance(method, Schedules):
        plans = [method.schedule(s, pm.n_layers) for s in shapes]
        return LMCounts.from_schedule(
            n_text, n_visual, pm.n_layers, [p.keep for p in plans], [p.skip for p in plans], [p.score_rows for p in plans]
        )
    plan, policies = method.decide(pm, prep)
    if policies:
        raise VlmpruneError(
            f"{type(method).__name__} decides inside the language model but has no schedule(sample, n_layers); "
            "a FLOPs budget cannot price it without running the model (see methods/base.py: Schedule)"
        )
    return LMCounts.from_plan(plan, n_text, n_visual, pm.n_layers)


def first_reaching(share, n: int, target: float) -> int:
    """The first index i in 0..n-1 with ``share(i) >= target`` (n - 1 if none), for a non-decreasing
    `share`. A safeguarded interpolation search: a priced share is close to linear in the budget, so
    a guess from the bracket's two shares lands within a step or two (about 4 pricings over 144
    candidates where a bisection needs 8); every other step is a bisection, so it never needs more
    than about twice a bisection's."""
    lo, hi = 0, n - 1  # the answer is in lo..hi; share(lo - 1) < target when lo > 0
    if n == 1 or share(lo) >= target:
        return lo
    if share(hi) < target:
        return hi
    interpolate = True  # from here: share(lo) < target <= share(hi)
    while hi - lo > 1:
        if interpolate:
            s_lo, s_hi = share(lo), share(hi)
            guess = lo + round((target - s_lo) / (s_hi - s_lo) * (hi - lo))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        lo, hi = (guess, hi) if share(guess) < target else (lo, guess)
        interpolate = not interpolate
    return hi


@dataclass(frozen=True)
class Budgeted:
    """A budget resolved for one batch: the method at the chosen budget, its value and its priced share."""

    method: Any
    value: float | int
    share: float


@dataclass(frozen=True)
class AtFlops:
    """Run `method` at the budget whose priced share of the full LM prefill FLOPs is closest to `share`.

    `method`: any token or layer method (its own budget value is replaced). `share`: the target, in
    (0, 1]. `knob`: the field to search (default: ``keep`` or ``keep_layers``, whichever it has).
    `resolve(pm, prep)` tells the chosen budget and its share without running anything.
    """

    method: Any
    share: float
    knob: str | None = None

    def __post_init__(self) -> None:
        share = self.share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise VlmpruneError(f"share={share!r} is outside (0, 1]: give the target share of the full model's FLOPs")
        if isinstance(self.method, (list, tuple)) or not isinstance(self.method, Method):
            raise VlmpruneError("AtFlops budgets one pruning method (e.g. vlmprune.FastV()); compose budgeted methods with a list")
        if not dataclasses.is_dataclass(self.method):
            raise VlmpruneError(f"AtFlops needs a dataclass method to set its budget; got {type(self.method).__name__}")
        knob = self.knob or budget_field(type(self.method))
        if knob not in {f.name for f in dataclasses.fields(self.method)}:
            raise VlmpruneError(f"{type(self.method).__name__} has no field {knob!r} to search")
        object.__setattr__(self, "knob", knob)

    def candidates(self, pm, prep) -> list[float | int]:
        """Budget values in increasing order: every layer count, or every token count as a ratio of each
        sample's visual tokens."""
        if self.knob == "keep_layers":  # from the method's floor, e.g. a router's layers that always run
            return list(range(self.method.min_layers(pm) if isinstance(self.method, HasLayerFloor) else 1, pm.n_layers + 1))
        counts = {n for n in prep.n_visual if n}
        if not counts:
            raise VlmpruneError("a token budget needs visual tokens; the batch has none")
        return sorted({k / n for n in counts for k in range(1, n + 1)})

    def price(self, pm, prep, value, shapes: list[SampleShape] | None = None) -> float:
        """The batch's priced LM prefill share with the budget set to `value` (the model does not run)."""
        method = dataclasses.replace(self.method, **{self.knob: value})
        return lm_share(pm.adapter.text_config, method_counts(method, pm, prep, shapes))

    def resolve(self, pm, prep) -> Budgeted:
        values = self.candidates(pm, prep)
        shapes = None if isinstance(self.method, PricesItself) else sample_shapes(prep)  # (it prices itself)
        memo: dict[int, float] = {}

        def share(i: int) -> float:
            if i not in memo:
                memo[i] = self.price(pm, prep, values[i], shapes)
            return memo[i]

        if len(values) > 1 and share(0) == share(len(values) - 1):
            raise VlmpruneError(f"{type(self.method).__name__}'s {self.knob} does not change its FLOPs here; nothing to search")
        lo = first_reaching(share, len(values), self.share)
        best = lo
        if lo > 0 and abs(share(lo - 1) - self.share) <= abs(share(lo) - self.share):
            best = lo - 1  # the cheaper one on a tie
        value = values[best]
        return Budgeted(dataclasses.replace(self.method, **{self.knob: value}), value, share(best))

    def decide(self, pm, prep):
        return self.resolve(pm, prep).method.decide(pm, prep)
