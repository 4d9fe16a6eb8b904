"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect", arXiv:2403.03853): remove the layers whose output changes their input least."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

from ...engine.plan import Plan
from ...engine.runner import prefill
from ...errors import VlmpruneError
from ..base import check_keep_layers, opt, skip_all_but
from ..registry import register_method


def block_influence(pm, batches: Iterable[dict]) -> torch.Tensor:
    """``[n_layers]`` Block Influence BI_i = 1 - E[cos(x_i, x_{i+1})], the mean over every real token of
    the calibration batches of the cosine between layer i's input and output hidden states."""
    n = pm.n_layers
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)

    def observe(layer, hidden_in, hidden_out, valid):
        cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (B, L)
        sums[layer] += float(cos[valid].sum())
        counts[layer] += float(valid.sum())

    with torch.no_grad():
        for inputs in batches:
            prep = pm.prepare(**inputs)
            prefill(pm.adapter, prep, Plan(), logits_to_keep=1, observers=[observe])
    if not bool((counts > 0).all()):
        raise VlmpruneError("ShortGPT calibration got no tokens; pass at least one batch of inputs")
    return 1 - sums / counts


@register_method("shortgpt", kind="layers", budget="keep_layers")
@dataclass(frozen=True)
class ShortGPT:
    """Keep `keep_layers` decoder layers: the ones with the highest Block Influence on calibration data.

        method = vlmprune.ShortGPT(keep_layers=5).calibrate(pm, calibration_batches)
        pm(**inputs, prune=method)
    """

    keep_layers: float | int = opt(0.75, "decoder layers kept: a share in (0, 1] or a count")
    scores: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Block Influence per layer, filled by calibrate(pm, batches)", "internal": True}
    )

    def __post_init__(self) -> None:
        check_keep_layers(self.keep_layers)

    def calibrate(self, pm, batches: Iterable[dict]) -> "ShortGPT":
        return replace(self, scores=tuple(block_influence(pm, batches).tolist()))

    def skipped(self, n_layers: int) -> list[int]:
        if self.scores is None:
            raise VlmpruneError("ShortGPT needs calibration data first: method = method.calibrate(pm, batches)")
        if len(self.scores) != n_layers:
            raise VlmpruneError(f"ShortGPT was calibrated on a {len(self.scores)}-layer model; this one has {n_layers}")
        return skip_all_but(torch.argsort(torch.tensor(self.scores), stable=True), self.keep_layers, n_layers)

    def decide(self, pm, prep):
        return Plan(skip=self.skipped(pm.n_layers)), []
