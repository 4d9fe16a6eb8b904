"""Accuracy of a model on FashionScenes, through the engine and any ``prune=`` decision, batched.

Every answer is one word = one token, so the greedy answer is the argmax of the prefill's last-token
logits: one prefill per batch, no decode loop.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..engine.plan import Plan
from ..pruned_model import PrunedModel
from ..testbed import data
from ..testbed.encode import encode
from .flops import flops as price


@dataclass
class VQAResult:
    accuracy: float
    per_type: dict[str, float]
    n: int
    visual_tokens_in: float  # mean visual tokens entering the first layer
    visual_tokens_kept: float  # mean visual tokens reaching the last layer
    layers_run: float  # mean decoder layers run
    lm_tflops: float  # mean language-model prefill TFLOPs per sample
    prefill_ms_per_sample: float  # wall time of the batched prefills / samples
    lm_share: float = 1.0  # LM prefill cost with the method's scoring (router included) / the unpruned prefill
    chance: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list, repr=False)
    correct: list[bool] = field(default_factory=list, repr=False)  # per question, in evaluation order

    def to_dict(self, with_predictions: bool = False, with_correct: bool = False) -> dict:
        """The summary; `with_predictions` / `with_correct` add the per-question answers / correctness
        (e.g. for `eval.bootstrap.paired_bootstrap` between two runs on the same questions)."""
        out = asdict(self)
        if not with_predictions:
            out.pop("predictions")
        if not with_correct:
            out.pop("correct")
        return out


def _plan_for(prune: Any, batch: Sequence[data.Sample]) -> Any:
    """A callable `prune` decides per batch (oracles, random plans); anything else passes through."""
    if callable(prune) and not isinstance(prune, Plan) and not hasattr(prune, "decide"):
        return prune(batch)
    return prune


def evaluate(
    pm: PrunedModel,
    samples: Sequence[data.Sample],
    prune: Any = None,
    batch_size: int = 32,
    progress: bool = True,
) -> VQAResult:
    """Greedy one-word accuracy, overall and per question type, with the runs' accounting.

    `prune`: None, a `Plan` (batch-size agnostic, e.g. a skip list), a pruning method, or a callable
    ``prune(batch_samples) -> Plan`` that decides per batch.
    """
    tokenizer = pm.processor.tokenizer
    vocab = tokenizer.get_vocab()
    inv = {i: w for w, i in vocab.items()}
    by_type: dict[str, list[bool]] = defaultdict(list)
    predictions: list[str] = []
    correct: list[bool] = []
    vis_in = vis_kept = layers = flops = cost = full = 0.0
    seconds = 0.0
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress, leave=False):
        batch = samples[start : start + batch_size]
        inputs = encode(batch, tokenizer)
        decision = _plan_for(prune, batch)
        t0 = time.perf_counter()
        out = pm(**inputs, prune=decision, logits_to_keep=1)
        seconds += time.perf_counter() - t0
        guess = out.last_logits.argmax(-1).tolist()
        for s, g in zip(batch, guess):
            word = inv.get(g, "<unk>")
            predictions.append(word)
            correct.append(word == s.answer)
            by_type[s.qtype].append(correct[-1])
        st = out.stats
        vis_in += float(st.visual_tokens[:, 0].sum())
        vis_kept += float(st.visual_tokens[:, -1].sum())
        layers += float(st.layers_run.sum())
        report = price(pm, st, vision=False)
        flops += float((report.lm_prefill + report.lm_head).sum())
        cost += float((report.lm_prefill + report.scoring).sum())
        full += float(report.lm_prefill_full.sum())
    n = len(samples)
    return VQAResult(
        accuracy=sum(correct) / max(n, 1),
        per_type={q: sum(v) / len(v) for q, v in sorted(by_type.items())},
        n=n,
        visual_tokens_in=vis_in / n,
        visual_tokens_kept=vis_kept / n,
        layers_run=layers / n,
        lm_tflops=flops / n / 1e12,
        prefill_ms_per_sample=seconds / n * 1e3,
        lm_share=cost / full if full else 1.0,
        chance=data.chance_accuracy(samples),
        predictions=predictions,
        correct=correct,
    )
