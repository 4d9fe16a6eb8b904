"""Suffix forwards for ECoFLaP's zeroth-order scores: skip the blocks that nothing perturbed.

While block i of a stack is perturbed, blocks 0..i-1 of that stack compute exactly what they compute
in the dense model, so their output is replayed instead of recomputed: every block before i returns
the cached hidden states reaching block i (the model's own forward still runs embeddings, the rest of
the stack, the head and the loss). The cache holds one block boundary for every calibration batch and
moves down the stack one block at a time, as `zeroth_order_scores` visits blocks in model order; a
vision block's scores skip vision blocks only (the language model then runs whole).

Skipping patches the block's ``forward`` on the instance (the module, its attributes and hooks stay),
and is undone on exit. On first use in a stack, one batch's loss with skipping is compared with the
ordinary forward; if they differ (a family whose loop reads its blocks' outputs differently), skipping
is switched off for that stack and forwards run whole, with a warning::

    suffix = SuffixLosses(model, batches, stacks, calibration_loss)
    scores = zeroth_order_scores(suffix.losses(), blocks, around_block=lambda k: suffix.skipping(*where[k]))
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .calibrate import Stack, capture_inputs, run_block, unpatch_forward

MATCH_RTOL = 1e-5  # relative loss difference above which skipping is judged unsafe for a stack


class SuffixLosses:
    """Per-batch loss functions whose forwards skip the unperturbed prefix of a stack (see module doc)."""

    def __init__(self, model: nn.Module, batches: Sequence[Mapping], stacks: Sequence[Stack], loss: Callable) -> None:
        self.model, self.batches, self.stacks, self.loss = model, list(batches), list(stacks), loss
        self._batch: int | None = None
        self._stack: str | None = None
        self._index = 0
        self._hidden: dict[int, torch.Tensor] = {}  # batch -> hidden states reaching block `_index`
        self._calls: dict[int, list] = {}  # batch -> each block's call (arguments besides hidden states)
        self._safe: dict[str, bool] = {}
        self.skipped_blocks = 0  # block forwards saved, for reports and tests

    def losses(self) -> list[Callable[[], torch.Tensor]]:
        """One zero-argument loss function per calibration batch."""
        return [functools.partial(self._loss, b) for b in range(len(self.batches))]

    def _loss(self, b: int) -> torch.Tensor:
        self._batch = b
        try:
            return self.loss(self.model, self.batches[b])
        finally:
            self._batch = None

    @contextmanager
    def skipping(self, stack: str, index: int) -> Iterator[None]:
        """Inside, forwards skip blocks ``0 .. index-1`` of `stack` ("vision" or "language"). Calls must
        come in model order (a stack's blocks ascending); the dense weights must be in place on entry."""
        blocks = self._move_to(stack, index)
        if index == 0 or not self._safe.get(stack, True):
            yield
            return
        skipped = list(blocks[:index])
        self._patch(skipped)
        try:
            if stack not in self._safe:
                self._safe[stack] = self._check(skipped)
            yield
        finally:
            unpatch_forward(skipped)

    # ------------------------------------------------------------------ internals

    def _stack_named(self, name: str) -> Stack:
        for stack in self.stacks:
            if stack.name == name:
                return stack
        raise KeyError(name)

    def _move_to(self, name: str, index: int) -> nn.ModuleList:
        stack = self._stack_named(name)
        if name != self._stack or index < self._index:
            first, calls, reached = capture_inputs(stack, self.batches)  # a batch without images skips the tower
            self._hidden = dict(zip(reached, first))
            self._calls = {b: [c[j] for c in calls] for j, b in enumerate(reached)}
            self._stack, self._index = name, 0
        with torch.no_grad():
            while self._index < index:  # dense block i-1 makes block i's inputs
                block = stack.blocks[self._index]
                self._hidden = {b: run_block(block, x, self._calls[b][self._index]) for b, x in self._hidden.items()}
                self._index += 1
        return stack.blocks

    def _patch(self, skipped: Sequence[nn.Module]) -> None:
        def replay(*args, **kwargs) -> torch.Tensor:
            self.skipped_blocks += 1
            return self._hidden[self._batch]

        for block in skipped:
            block.forward = replay

    def _check(self, skipped: Sequence[nn.Module]) -> bool:
        """Whether one batch's loss with the (patched) blocks skipped equals its whole forward; if not,
        the blocks are left unpatched."""
        b = next(iter(self._hidden), None)
        if b is None:
            return True
        with torch.no_grad():  # a loss may be one scalar or per-row sums (`samples.loss_sums`)
            fast = torch.as_tensor(self._loss(b)).double()
            unpatch_forward(skipped)
            whole = torch.as_tensor(self._loss(b)).double()
        self._patch(skipped)
        gap = float((fast - whole).abs().max())
        if gap <= MATCH_RTOL * max(1.0, float(whole.abs().max())):
            return True
        warnings.warn(
            f"skipping unperturbed blocks changed the {self._stack} loss (by up to {gap:.3g}, of {float(whole.abs().max()):.6g}); "
            "zeroth-order scores run whole forwards for this stack (slower, same result)",
            stacklevel=3,
        )
        unpatch_forward(skipped)
        return False
