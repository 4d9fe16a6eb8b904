"""Stratified random visual-token dropping: `random`, spread over the image like PAR's router.

The tile-balanced rule of `methods/tiles.py` with uniform random scores in place of a router's: the
grid is cut into about k tiles and one random token of every tile is kept before a second of any (above
half the tokens, one random token of every tile is dropped before a second of any). It separates what
a learned router gains from *where* it looks from what it gains by merely covering the image.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ...engine.plan import Plan
from ..base import check_keep, check_layer, keep_count
from ..registry import register_method
from ..tiles import balanced_scores


def sample_fingerprint(input_ids: torch.Tensor, visual_embeds: torch.Tensor) -> int:
    """A 32-bit fingerprint of one sample alone: the crc32 of its real token ids (int64, little-endian)
    followed by the mean absolute value of its visual-token input embeddings (float64, 4 significant
    digits). Padding, batch position and the other samples do not enter it. The embedding term only
    tells apart images under the same prompt; rounding makes it robust to kernel-level float noise (a
    batch could only change it if that noise moved the mean across a 4th-digit rounding boundary)."""
    ids = input_ids.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes()
    scale = float(visual_embeds.detach().double().abs().mean()) if visual_embeds.numel() else 0.0
    return zlib.crc32(f"{scale:.3e}".encode(), zlib.crc32(ids))


@register_method("stratified-random")
@dataclass(frozen=True)
class StratifiedRandom:
    """Keep a random `keep` (ratio or count) of each sample's visual tokens from `layer` on (0 = before
    the LLM), tile-balanced: one random token of every tile before a second of any (`tiles.balanced_row`).

    Reproducible and batch-independent: sample b draws its uniform scores from a generator seeded with
    the crc32 of `seed` (8 bytes, little-endian) continued from ``sample_fingerprint`` of that sample,
    so the same sample gets the same tokens alone or in any padded batch, and a different `seed` gives
    a different generator seed (distinct for seeds that differ by less than 2**32; 32 bits because
    torch's CPU generator keeps only the low 32 bits of a seed)."""

    keep: float | int = 0.25
    layer: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def logits(self, prep) -> torch.Tensor:
        """``[B, max n_visual]`` each sample's uniform random scores (zeros past its visual count)."""
        counts = prep.n_visual
        out = torch.zeros(len(counts), max(counts, default=0))
        for b, n in enumerate(counts):
            real = prep.attention_mask[b].bool()
            visual = prep.visual_mask[b] & real
            mine = sample_fingerprint(prep.input_ids[b][real], prep.inputs_embeds[b][visual])
            seed = zlib.crc32(int(self.seed).to_bytes(8, "little", signed=True), mine)
            out[b, :n] = torch.rand(n, generator=torch.Generator().manual_seed(seed))
        return out

    def decide(self, pm, prep):
        check_layer(self.layer, pm.n_layers)
        counts = prep.n_visual
        k = [keep_count(self.keep, n) if n else 0 for n in counts]
        scores = balanced_scores(self.logits(prep), counts, prep.visual_grids, torch.tensor(k))
        rows = [row[:n].topk(kb).indices.sort().values for row, n, kb in zip(scores, counts, k)]
        return Plan(keep={self.layer: rows}), []
