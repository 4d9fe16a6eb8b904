"""`Plan`: a pruning decision as plain, validated data.

A plan says, per sample, which visual tokens survive from which decoder layer on, and which decoder
layers do not run. It is enough on its own to execute (the engine) and to price (FLOPs), and it
round-trips through JSON.

Semantics (also in the README):

* ``keep={K: idx}``: ``idx`` lists, per sample, indices into that sample's visual tokens
  (``0 .. n_visual-1``, counted in sequence order from ``input_ids == image_token_id``) that survive
  *from decoder layer K on*. Layers ``< K`` see every token; layers ``>= K`` see only the kept visual
  tokens (and every text token). ``K = 0`` drops tokens before the first layer. ``idx`` is a
  ``LongTensor [batch, k]`` (every sample keeps ``k``) or a list of 1-D tensors (ragged counts).
  Order inside a row does not matter; tokens always stay in their original sequence order.
* Several stages are allowed; indices always refer to the *original* visual-token numbering, and a
  later stage must keep a subset of the earlier one (a dropped token never comes back).
* ``skip=[i, j]``: decoder layers ``i`` and ``j`` are not run for any sample; ``skip=[[...], [...]]``
  gives one list per sample. Either is held as `SkippedLayers` (``plan.skip``; ``plan.skip_sets(batch)``
  gives one set per sample).
* ``merge={K: assign}`` (optional, with a ``keep`` stage at the same K): per sample, a row of length
  ``n_visual`` giving each visual token's target: a kept token it is averaged into, itself for a kept
  token, -1 to discard it. At stage K a kept token's hidden state becomes the mean of every token
  assigned to it (pooling, VisionZip's contextual tokens, SparseVLM's recycling); it keeps its own
  position.
* ``overhead`` (optional): multiply-adds the deciding method spent before the LLM, per sample (a
  number for every sample, or one per sample), e.g. PAR's router; the accountant prices them with the
  method's scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import VlmpruneError
from .skips import SkippedLayers
from ..validate import is_integer, is_number

KeepRows = tuple[torch.Tensor, ...]  # one sorted 1-D LongTensor per sample


def _as_rows(layer: int, idx: Any) -> KeepRows:
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 1:
            raise VlmpruneError(
                f"Plan.keep[{layer}] is 1-D; give a [batch, k] LongTensor (use idx[None] for one sample)"
            )
        if idx.dim() != 2:
            raise VlmpruneError(f"Plan.keep[{layer}] must be a [batch, k] LongTensor, got shape {tuple(idx.shape)}")
        rows = list(idx)
    elif isinstance(idx, Sequence) and not isinstance(idx, (str, bytes)):
        rows = [torch.as_tensor(r) for r in idx]
    else:
        raise VlmpruneError(f"Plan.keep[{layer}] must be a [batch, k] LongTensor or a list of 1-D tensors")
    for b, row in enumerate(rows):
        if row.dtype.is_floating_point or row.dtype == torch.bool or row.dim() != 1:
            raise VlmpruneError(f"Plan.keep[{layer}] row {b}: indices must be a 1-D integer tensor")
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(rows)
    by_length: dict[int, list[int]] = {}
    for b, row in enumerate(rows):
        by_length.setdefault(row.numel(), []).append(b)
    problems: dict[int, str] = {}
    for length, members in by_length.items():  # rows of one length are sorted and checked together
        if not length:
            continue
        ordered = torch.stack([rows[b].detach().to("cpu", torch.long) for b in members]).sort(1).values
        negative, repeated = (ordered[:, 0] < 0).tolist(), (ordered.diff(dim=1) == 0).any(1).tolist()
        for b, row, neg, dup in zip(members, ordered, negative, repeated):
            if neg:
                problems[b] = f"negative index {int(row[0])}; indices count from 0"
            elif dup:
                problems[b] = "duplicated visual-token indices; each index at most once"
            out[b] = row
    if problems:
        b = min(problems)
        raise VlmpruneError(f"Plan.keep[{layer}] row {b}: {problems[b]}")
    return tuple(out)


def _as_assign(layer: int, rows: Any) -> KeepRows:
    rows = list(rows) if isinstance(rows, torch.Tensor) and rows.dim() == 2 else rows
    if not isinstance(rows, Sequence) or isinstance(rows, torch.Tensor):
        raise VlmpruneError(f"Plan.merge[{layer}] must be a [batch, n_visual] LongTensor or a list of 1-D tensors")
    out = []
    for b, row in enumerate(rows):
        row = torch.as_tensor(row)
        if row.dtype.is_floating_point or row.dim() != 1:
            raise VlmpruneError(f"Plan.merge[{layer}] row {b}: targets must be a 1-D integer tensor")
        out.append(row.detach().to("cpu", torch.long))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """Which visual tokens survive from which layer on, and which decoder layers are skipped.

    Example::

        plan = Plan(keep={2: torch.tensor([[0, 5, 9]])}, skip=[6])  # batch 1: keep 3 tokens from layer 2 on
    """

    keep: Mapping[int, Any] = field(default_factory=dict)
    skip: Any = ()  # normalised to `SkippedLayers`
    merge: Mapping[int, Any] = field(default_factory=dict)
    overhead: Any = 0.0

    def __post_init__(self) -> None:
        overhead = self.overhead
        if isinstance(overhead, torch.Tensor):
            overhead = overhead.tolist()
        values = list(overhead) if isinstance(overhead, (list, tuple)) else [overhead]
        if any(not is_number(v) or not v >= 0 for v in values):
            raise VlmpruneError(f"Plan.overhead must be multiply-adds >= 0 (a number or one per sample), got {self.overhead!r}")
        object.__setattr__(self, "overhead", tuple(float(v) for v in overhead) if isinstance(overhead, (list, tuple)) else float(overhead))
        keep: dict[int, KeepRows] = {}
        for layer, idx in sorted(dict(self.keep).items()):
            if not is_integer(layer) or layer < 0:
                raise VlmpruneError(f"Plan.keep layer {layer!r} must be an integer >= 0 (a decoder layer index)")
            keep[layer] = _as_rows(layer, idx)
        sizes = {len(rows) for rows in keep.values()}
        if len(sizes) > 1:
            raise VlmpruneError(f"Plan.keep stages disagree on the batch size: {sorted(sizes)}")
        skip = SkippedLayers.parse(self.skip)
        if skip.batch_size is not None and sizes and skip.batch_size not in sizes:
            raise VlmpruneError(f"Plan.skip has {skip.batch_size} per-sample lists but keep has batch {sizes.pop()}")
        batches = sizes | ({skip.batch_size} if skip.batch_size is not None else set())
        if isinstance(self.overhead, tuple) and batches and len(self.overhead) not in batches:
            raise VlmpruneError(f"Plan.overhead has {len(self.overhead)} per-sample values but the plan is for batch {batches.pop()}")
        merge: dict[int, KeepRows] = {}
        for layer, rows in sorted(dict(self.merge).items()):
            if layer not in keep:
                raise VlmpruneError(f"Plan.merge[{layer}] needs a keep stage at layer {layer}")
            merge[layer] = _as_assign(layer, rows)
            if len(merge[layer]) != len(keep[layer]):
                raise VlmpruneError(f"Plan.merge[{layer}] has {len(merge[layer])} rows but keep has {len(keep[layer])}")
            for b, (assign, kept) in enumerate(zip(merge[layer], keep[layer])):
                self_mapped = torch.nonzero(assign == torch.arange(assign.numel())).squeeze(1)
                if not torch.equal(self_mapped, kept):
                    raise VlmpruneError(f"Plan.merge[{layer}] row {b}: exactly the kept tokens must map to themselves")
                targets = assign[assign >= 0]
                if int((assign < -1).sum()) or not bool(torch.isin(targets, kept).all()):
                    raise VlmpruneError(f"Plan.merge[{layer}] row {b}: targets must be kept tokens or -1 (discard)")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "skip", skip)
        object.__setattr__(self, "merge", merge)

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        """True when the plan drops nothing and skips nothing."""
        return not self.keep and not self.skip

    @property
    def batch_size(self) -> int | None:
        """The batch size the plan is written for, or None if it fits any batch."""
        for rows in self.keep.values():
            return len(rows)
        if self.skip.batch_size is not None:
            return self.skip.batch_size
        return len(self.overhead) if isinstance(self.overhead, tuple) else None

    def overheads(self, batch: int) -> tuple[float, ...]:
        """The deciding method's multiply-adds before the LLM, one per sample."""
        return self.overhead if isinstance(self.overhead, tuple) else (self.overhead,) * batch

    def skip_sets(self, batch: int) -> tuple[frozenset[int], ...]:
        """One set of skipped layers per sample."""
        return self.skip.for_batch(batch)

    def validate(self, n_layers: int, n_visual: Sequence[int]) -> None:
        """Check the plan against a model depth and each sample's visual-token count."""
        batch = len(n_visual)
        if self.batch_size is not None and self.batch_size != batch:
            raise VlmpruneError(f"the plan is for batch {self.batch_size} but the input has batch {batch}")
        for skip in self.skip_sets(batch):
            bad = sorted(i for i in skip if i >= n_layers)
            if bad:
                raise VlmpruneError(f"Plan.skip layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}")
        previous: KeepRows | None = None
        for layer, rows in self.keep.items():
            if layer >= n_layers:
                raise VlmpruneError(
                    f"Plan.keep stage K={layer} is out of range: the model has decoder layers 0..{n_layers - 1}"
                )
            for b, row in enumerate(rows):
                if layer in self.merge and self.merge[layer][b].numel() != n_visual[b]:
                    raise VlmpruneError(
                        f"Plan.merge[{layer}] row {b} has {self.merge[layer][b].numel()} targets; "
                        f"sample {b} has {n_visual[b]} visual tokens"
                    )
                if row.numel() and int(row.max()) >= n_visual[b]:
                    raise VlmpruneError(
                        f"Plan.keep[{layer}] row {b}: index {int(row.max())} is out of range; "
                        f"sample {b} has visual tokens 0..{n_visual[b] - 1}"
                    )
                if previous is not None and not bool(torch.isin(row, previous[b]).all()):
                    raise VlmpruneError(
                        f"Plan.keep[{layer}] row {b} keeps tokens dropped at an earlier stage; "
                        "later stages must keep a subset of earlier ones"
                    )
            previous = rows

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        out = {"keep": {str(k): [r.tolist() for r in rows] for k, rows in self.keep.items()}, "skip": self.skip.to_json()}
        if self.merge:
            out["merge"] = {str(k): [r.tolist() for r in rows] for k, rows in self.merge.items()}
        if self.overhead:
            out["overhead"] = list(self.overhead) if isinstance(self.overhead, tuple) else self.overhead
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        unknown = set(data) - {"keep", "skip", "merge", "overhead"}
        if unknown:
            raise VlmpruneError(f"unknown Plan fields {sorted(unknown)}; a plan has 'keep', 'skip', 'merge' and 'overhead'")
        rows = lambda field: {int(k): [torch.tensor(r, dtype=torch.long) for r in v] for k, v in data.get(field, {}).items()}
        return cls(keep=rows("keep"), skip=data.get("skip", ()), merge=rows("merge"), overhead=data.get("overhead", 0.0))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        stages = ", ".join(
            f"K={k}: keep {'/'.join(str(r.numel()) for r in rows)}{' (merged)' if k in self.merge else ''}"
            for k, rows in self.keep.items()
        ) or "no token stages"
        return f"Plan({stages}; skip={self.skip.to_json()})"
