"""`SkippedLayers`: the decoder layers a plan does not run, shared by the batch or one set per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import VlmpruneError

_ROW_TYPES = (list, tuple, set, frozenset, torch.Tensor)


@dataclass(frozen=True)
class SkippedLayers:
    """Decoder layers that do not run.

    ``sets`` holds one frozenset of layer indices per sample when ``per_sample``, else a single set
    that every sample of any batch skips. Build one with `parse` from what `Plan(skip=...)` takes:
    ``[i, j]`` (shared) or ``[[...], [...]]`` (per sample)."""

    sets: tuple[frozenset[int], ...] = (frozenset(),)
    per_sample: bool = False

    def __post_init__(self) -> None:
        if not self.per_sample and len(self.sets) != 1:
            raise VlmpruneError(f"a shared skip holds one set of layers, got {len(self.sets)}")
        for s in self.sets:
            if any(i < 0 for i in s):
                raise VlmpruneError(f"Plan.skip has a negative layer index: {sorted(s)}")

    @classmethod
    def parse(cls, skip: Any) -> "SkippedLayers":
        """From layer indices (shared), or one sequence (or 1-D tensor) of indices per sample."""
        if isinstance(skip, SkippedLayers):
            return skip
        items = list(skip)
        if any(isinstance(s, _ROW_TYPES) and not _is_scalar_tensor(s) for s in items):
            rows = tuple(frozenset(int(i) for i in (s.tolist() if isinstance(s, torch.Tensor) else s)) for s in items)
            return cls(rows, per_sample=True)
        return cls((frozenset(int(i) for i in items),))

    @property
    def batch_size(self) -> int | None:
        """The samples the sets are for, or None when shared (any batch)."""
        return len(self.sets) if self.per_sample else None

    @property
    def layers(self) -> frozenset[int]:
        """Every layer some sample skips."""
        return frozenset().union(*self.sets)

    def for_batch(self, batch: int) -> tuple[frozenset[int], ...]:
        """One set of skipped layers per sample of a batch of `batch`."""
        return self.sets if self.per_sample else self.sets * batch

    def __bool__(self) -> bool:
        """True when some sample skips some layer."""
        return any(self.sets)

    def to_json(self) -> list:
        """Sorted indices (shared) or one sorted list per sample: the plan's JSON and printed form."""
        rows = [sorted(s) for s in self.sets]
        return rows if self.per_sample else rows[0]


def _is_scalar_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0
