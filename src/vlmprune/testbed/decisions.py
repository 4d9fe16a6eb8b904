"""Per-batch decisions that probe the testbed: random visual-token drops and two oracles.

Each returns a callable ``decide(batch_samples) -> Plan`` for `vlmprune.eval.vqa.evaluate`. Tokens are
dropped before the first decoder layer (K = 0). The oracles show where the answer lives: in the
tokens of the non-empty cells, and, for a cell question, in the 16 tokens of the cell asked about.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..engine.plan import Plan
from ..errors import VlmpruneError
from . import data
from .encode import N_VISUAL, cell_token_indices

Decide = Callable[[Sequence[data.Sample]], Plan]


def random_keep(ratio: float, seed: int = 0, layer: int = 0) -> Decide:
    """Keep a uniformly random `ratio` of each sample's visual tokens from `layer` on (seeded, in batch order)."""
    if not 0 < ratio <= 1:
        raise VlmpruneError(f"keep ratio must be in (0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(ratio * N_VISUAL))

    def decide(batch: Sequence[data.Sample]) -> Plan:
        return Plan(keep={layer: torch.stack([torch.randperm(N_VISUAL, generator=gen)[:k] for _ in batch])})

    return decide


def nonempty_cells(batch: Sequence[data.Sample]) -> Plan:
    """Oracle: keep only the visual tokens of the cells that hold an item."""
    rows = []
    for s in batch:
        cells = [i for i, c in enumerate(s.cells) if c != data.EMPTY]
        rows.append(torch.cat([cell_token_indices(c) for c in cells]) if cells else torch.zeros(0, dtype=torch.long))
    return Plan(keep={0: rows})


def asked_cell(batch: Sequence[data.Sample]) -> Plan:
    """Oracle for cell questions: keep only the 16 visual tokens of the cell the question names."""
    rows = []
    for s in batch:
        if s.qtype != "cell":
            raise VlmpruneError("the asked-cell oracle applies to cell questions only; filter the samples first")
        name = s.question.split()[-2]  # "what is in the {cell} ?"
        rows.append(cell_token_indices(data.CELLS.index(name)))
    return Plan(keep={0: rows})
