"""The language model's work as counts (`LMCounts`, per sample and decoder layer) and their prices in
multiply-adds: a decoder layer over n tokens, attention-score rows, the LM head, FastV's paper
convention. It sits just above the engine (it reads `RunStats` and `Plan`) so that methods price their
own schedules (`AtFlops`, PAR, DART, Downsample) without importing the evaluation layer; the
accountant (`eval.flops`) adds the vision side and re-exports these names. The formulas are in
`eval.flops`'s docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .engine.plan import Plan
from .engine.stats import RunStats
from .errors import VlmpruneError


def _dims(text_config) -> tuple[int, int, int, int, int]:
    """d, H, Hkv, hd, m of a decoder config."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    return d, heads, kv_heads, head_dim, text_config.intermediate_size


def layer_macs(text_config, n_tokens: torch.Tensor) -> torch.Tensor:
    """MACs of one decoder layer run over ``n_tokens`` (any shape of integer counts)."""
    d, heads, kv_heads, head_dim, m = _dims(text_config)
    n = torch.as_tensor(n_tokens).to(torch.float64)
    proj = 2 * n * d * heads * head_dim + 2 * n * d * kv_heads * head_dim
    attn = 2 * n * n * heads * head_dim
    mlp = 3 * n * d * m
    return proj + attn + mlp


def score_macs(text_config, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """MACs of attention-score rows: one q projection per row and one row of scores against `keys` keys."""
    d, heads, _, head_dim, _ = _dims(text_config)
    rows, keys = torch.as_tensor(rows).to(torch.float64), torch.as_tensor(keys).to(torch.float64)
    return rows * d * heads * head_dim + rows * keys * heads * head_dim


def fastv_layer_flops(text_config, n_tokens: torch.Tensor) -> torch.Tensor:
    """FastV's convention for one layer over n tokens: ``4*n*d^2 + 2*n^2*d + 2*n*d*m`` (arXiv:2403.06764)."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    n = torch.as_tensor(n_tokens).to(torch.float64)
    return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def prefill_flops(text_config, stats: RunStats, head_rows: int | torch.Tensor = 1) -> torch.Tensor:
    """``[B]`` FLOPs of each sample's language-model prefill: the layers it ran plus `head_rows` LM-head rows."""
    per_layer = layer_macs(text_config, stats.tokens) * stats.layers_run
    head = torch.as_tensor(head_rows, dtype=torch.float64) * text_config.hidden_size * text_config.vocab_size
    return 2 * (per_layer.sum(1) + head)


@dataclass
class LMCounts:
    """The language model's work as counts, per sample (``[B]``) and decoder layer (``[B, n_layers]``):
    real tokens at each depth, whether the layer ran, query rows scored from it, the prompt's text and
    visual tokens and the LM-head rows. What `RunStats` records, or what a plan or a method's schedule
    implies."""

    tokens: torch.Tensor
    layers_run: torch.Tensor
    score_rows: torch.Tensor
    input_text: torch.Tensor
    input_visual: torch.Tensor
    head_rows: torch.Tensor
    overhead: torch.Tensor | None = None  # [B] MACs the deciding method spent before the LLM (`Plan.overhead`)

    @property
    def input_tokens(self) -> torch.Tensor:
        return self.input_text + self.input_visual

    @classmethod
    def from_stats(cls, stats: RunStats) -> "LMCounts":
        text = stats.tokens[:, 0] - stats.visual_tokens[:, 0]
        input_visual = stats.input_visual
        if input_visual is None:
            if 0 in stats.plan.keep:
                raise VlmpruneError("these stats do not record the prompt's visual tokens; price the run's own stats")
            input_visual = stats.visual_tokens[:, 0]
        rows = stats.score_rows if stats.score_rows is not None else torch.zeros_like(stats.tokens)
        head = stats.head_rows if stats.head_rows is not None else torch.ones_like(text)
        overhead = torch.tensor(stats.plan.overheads(text.shape[0]), dtype=torch.float64)
        return cls(stats.tokens, stats.layers_run, rows, text, input_visual, head, overhead)

    @classmethod
    def from_schedule(
        cls,
        n_text: Sequence[int],
        n_visual: Sequence[int],
        n_layers: int,
        keep: Sequence[Mapping[int, int]],
        skip: Sequence[Sequence[int]] = (),
        score_rows: Sequence[Mapping[int, int]] = (),
        head_rows: int | Sequence[int] = 1,
    ) -> "LMCounts":
        """Counts from, per sample, the visual tokens present from each stage layer on (`keep`), the
        skipped layers and the query rows scored per layer."""
        batch = len(n_text)
        tokens, run, rows = [], [], []  # Python lists, one tensor each at the end (AtFlops prices many)
        for b in range(batch):
            present, row = n_visual[b], []
            for layer in range(n_layers):
                present = keep[b].get(layer, present)
                row.append(int(n_text[b] + present))
            tokens.append(row)
            skipped = {int(layer) for layer in skip[b]} if skip else set()
            if not skipped <= set(range(n_layers)):
                raise VlmpruneError(f"sample {b} skips layers {sorted(skipped)}, outside 0..{n_layers - 1}")
            run.append([layer not in skipped for layer in range(n_layers)])
            scored = [0] * n_layers
            for layer, r in (score_rows[b] if score_rows else {}).items():
                scored[layer] += int(r)
            rows.append(scored)
        shape = (batch, n_layers)
        tokens = torch.tensor(tokens, dtype=torch.long).reshape(shape)
        run = torch.tensor(run, dtype=torch.bool).reshape(shape)
        rows = torch.tensor(rows, dtype=torch.long).reshape(shape)
        text, visual = torch.as_tensor(n_text, dtype=torch.long), torch.as_tensor(n_visual, dtype=torch.long)
        head = torch.as_tensor(head_rows, dtype=torch.long).expand(batch).clone()
        return cls(tokens, run, rows, text, visual, head)

    @classmethod
    def from_plan(cls, plan: Plan, n_text: Sequence[int], n_visual: Sequence[int], n_layers: int, head_rows=1) -> "LMCounts":
        plan.validate(n_layers, list(n_visual))
        batch = len(n_text)
        keep = [{layer: int(rows[b].numel()) for layer, rows in plan.keep.items()} for b in range(batch)]
        counts = cls.from_schedule(n_text, n_visual, n_layers, keep, plan.skip_sets(batch), head_rows=head_rows)
        counts.overhead = torch.tensor(plan.overheads(batch), dtype=torch.float64)
        return counts

    def macs(self, text_config) -> dict[str, torch.Tensor]:
        """``[B]`` MACs: decoder layers run, scoring overhead, LM head, and every layer over every prompt token."""
        layers = (layer_macs(text_config, self.tokens) * self.layers_run).sum(1)
        scoring = score_macs(text_config, self.score_rows, self.tokens).sum(1)
        if self.overhead is not None:
            scoring = scoring + self.overhead
        head = self.head_rows.to(torch.float64) * text_config.hidden_size * text_config.vocab_size
        full = layer_macs(text_config, self.input_tokens) * self.tokens.shape[1]
        return {"layers": layers, "scoring": scoring, "head": head, "full": full}

    def fastv_flops(self, text_config) -> torch.Tensor:
        return (fastv_layer_flops(text_config, self.tokens) * self.layers_run).sum(1)


def lm_share(text_config, counts: LMCounts) -> float:
    """The batch's LM prefill cost (layers run + scoring) as a share of every layer over every prompt token."""
    macs = counts.macs(text_config)
    return float((macs["layers"] + macs["scoring"]).sum() / macs["full"].sum())
