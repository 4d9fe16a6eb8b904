"""What a forward actually ran: the accounting every result carries beside its logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Plan


@dataclass(kw_only=True)
class RunStats:
    """Per sample and decoder layer (tensors ``[B, n_layers]``); built by keyword.

    ``tokens`` / ``visual_tokens``: real tokens (visual ones) in the sequence at that depth, i.e. that a
    layer there processes if it runs. ``layers_run``: whether the layer ran for the sample.
    ``kv_entries``: real tokens in that layer's KV cache (0 for a layer that did not run).
    ``plan``: the decision that was applied (in-model policies' choices included), enough to price it.
    ``input_visual`` ``[B]``: visual tokens in the prompt (before any drop). ``head_rows`` ``[B]``: rows
    that reached the LM head. ``score_rows`` ``[B, n_layers]``: query rows whose attention scores
    in-model policies read from that layer (one q projection of the row against the layer's
    ``tokens`` keys each); the accountant (`vlmprune.flops`) prices these. ``vision_inputs``: set when a
    method re-encoded the images before the vision tower (Downsample): the geometry the tower ran on
    (``image_sizes`` / ``image_grid_thw``) and ``n_visual``, the re-encoded prompt's visual tokens per
    sample; ``input_visual`` then stays the caller's prompt's, so shares are of the unpruned model.
    """

    tokens: torch.Tensor
    visual_tokens: torch.Tensor
    layers_run: torch.Tensor
    kv_entries: torch.Tensor
    plan: Plan
    kv_bytes: int = 0
    input_visual: torch.Tensor | None = None
    head_rows: torch.Tensor | None = None
    score_rows: torch.Tensor | None = None
    vision_inputs: dict | None = None

    def summary(self, sample: int = 0) -> str:
        run = self.layers_run[sample]
        vis = self.visual_tokens[sample]
        rows = [
            f"layer {i:>2}: {'run ' if run[i] else 'skip'} visual={int(vis[i]):>5} tokens={int(self.tokens[sample, i]):>5} "
            f"kv={int(self.kv_entries[sample, i]):>5}"
            for i in range(run.numel())
        ]
        head = (
            f"layers run {int(run.sum())}/{run.numel()}, visual tokens in -> out "
            f"{int(vis[0])} -> {int(vis[-1])}, KV cache {self.kv_bytes / 2**20:.2f} MiB"
        )
        return "\n".join([head, *rows])
