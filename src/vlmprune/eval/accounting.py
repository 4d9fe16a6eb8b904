"""Running totals of what pruned runs cost: visual tokens, layers, FLOPs, KV bytes and timings, summed
over batches (and over processes) and reported as means per sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .flops import INPUT_KEYS
from .flops import flops as price


@dataclass
class RunTotals:
    samples: int = 0
    visual_tokens_in: float = 0.0  # entering the first layer
    visual_tokens_kept: float = 0.0  # reaching the last layer
    layers_run: float = 0.0
    lm_flops: float = 0.0  # LM prefill with the head
    total_flops: float = 0.0  # prefill with the vision tower and projector
    cost_flops: float = 0.0  # LM prefill with the method's scoring (router included)
    full_flops: float = 0.0  # the unpruned LM prefill
    kv_bytes: float = 0.0  # the KV cache after the run
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # batched decode steps

    def add(self, pm, stats, inputs: dict[str, Any], prefill_seconds: float = 0.0, decode_seconds: float = 0.0,
            decode_steps: int = 0) -> None:
        """One batch: its `RunStats`, the inputs it ran on (for the FLOPs of the vision tower) and its timings."""
        report = price(pm, stats, **{k: v for k, v in inputs.items() if k in INPUT_KEYS})
        self.samples += int(stats.layers_run.shape[0])
        self.visual_tokens_in += float(stats.input_visual.sum())
        self.visual_tokens_kept += float(stats.visual_tokens[:, -1].sum())
        self.layers_run += float(stats.layers_run.sum())
        self.lm_flops += float((report.lm_prefill + report.lm_head).sum())
        self.total_flops += float(report.total.sum())
        self.cost_flops += float((report.lm_prefill + report.scoring).sum())
        self.full_flops += float(report.lm_prefill_full.sum())
        self.kv_bytes += float(stats.kv_bytes or 0)
        self.prefill_seconds += prefill_seconds
        self.decode_seconds += decode_seconds
        self.decode_steps += decode_steps

    def __add__(self, other: "RunTotals") -> "RunTotals":
        return RunTotals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def means(self) -> dict[str, float]:
        """Per sample: visual tokens in / kept, layers run, LM and total TFLOPs, KV bytes, prefill ms; decode ms
        per batched step; and the LM share (the method's cost over the unpruned prefill)."""
        n = max(self.samples, 1)
        return dict(
            visual_tokens_in=self.visual_tokens_in / n,
            visual_tokens_kept=self.visual_tokens_kept / n,
            layers_run=self.layers_run / n,
            lm_tflops=self.lm_flops / n / 1e12,
            tflops=self.total_flops / n / 1e12,
            lm_share=self.cost_flops / self.full_flops if self.full_flops else 1.0,
            kv_bytes=self.kv_bytes / n,
            prefill_ms_per_sample=self.prefill_seconds / n * 1e3,
            decode_ms_per_token=self.decode_seconds / max(self.decode_steps, 1) * 1e3,
        )

    def to_dict(self) -> dict:
        return dict(totals=asdict(self), means=self.means())
