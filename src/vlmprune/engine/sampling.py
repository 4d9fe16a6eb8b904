"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import VlmpruneError
from ..validate import is_share


@dataclass(frozen=True)
class SamplingConfig:
    """``do_sample=False`` is greedy. Otherwise logits are divided by `temperature`, cut to the `top_k`
    most likely tokens (0 = no cut), then to the smallest set whose probability reaches `top_p`
    (1.0 = no cut), in that order, as transformers' generate applies them."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise VlmpruneError(f"temperature must be > 0, got {self.temperature}")
        if not is_share(self.top_p, allow_zero=False):
            raise VlmpruneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise VlmpruneError(f"top_k must be >= 0, got {self.top_k}")

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B]`` token ids."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = sorted_scores.softmax(-1)
            # drop a token once the tokens before it already reach top_p (the first always stays)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.top_p
            drop = drop_sorted.scatter(1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
