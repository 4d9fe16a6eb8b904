"""Evaluation on a user's own data: generated answers under a pruning decision, against the full
model's greedy answers (agreement, KL over its response tokens) and against reference answers where
the data has them (normalised exact match), with the runs' accounting and timings.

For every batch the full model's greedy response (up to `max_new_tokens`, through EOS) is the
reference; the pruned model generates its own answer, and is teacher-forced on the full response
(`PrunedModel.score_response`) for the KL. Pass `reference=` (from `full_responses`) to reuse the
full model's responses across methods.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data import Example, encode_examples, image_channels
from ..pruned_model import PrunedModel
from .accounting import RunTotals

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and the articles a / an / the removed, spaces collapsed."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


@dataclass
class Reference:
    """The full model's greedy responses for one batch: ``tokens [B, N]`` (padding after EOS) and
    ``lengths [B]`` (tokens through the first EOS)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]


@dataclass
class AnswersResult:
    n: int
    agreement: float  # share of answers identical to the full model's
    mean_kl: float  # mean over samples of KL(full || pruned), averaged over the full response's tokens
    accuracy: float | None  # normalised exact match against the data's answers (None: the data has none)
    n_answers: int  # samples with a reference answer
    visual_tokens_in: float
    visual_tokens_kept: float  # reaching the last layer
    layers_run: float
    lm_tflops: float  # mean LM prefill TFLOPs per sample (head included)
    tflops: float  # mean total prefill TFLOPs per sample (vision tower and projector included)
    lm_share: float  # LM prefill cost with the method's scoring / the unpruned prefill
    kv_bytes: float  # mean KV-cache bytes per sample after decoding
    prefill_ms_per_sample: float
    decode_ms_per_token: float  # per batched decode step
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, with_samples: bool = True) -> dict:
        out = asdict(self)
        if not with_samples:
            out.pop("samples")
        return out


def _batches(examples: Sequence[Example], batch_size: int) -> list[Sequence[Example]]:
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def _response(pm: PrunedModel, sequences: torch.Tensor, prompt_len: int) -> Reference:
    new = sequences[:, prompt_len:]
    eos = set(pm.eos_ids())
    lengths, texts = [], []
    tokenizer = pm.processor.tokenizer
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        lengths.append(end)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return Reference(new, torch.tensor(lengths), texts)


def _inputs(pm: PrunedModel, batch: Sequence[Example]) -> dict:
    inputs = encode_examples(pm.processor, batch, image_channels(pm.config))
    return pm.to_input_device(inputs)  # the embedding's execution device (its weight may be offloaded to meta)


@torch.no_grad()
def full_responses(pm: PrunedModel, examples: Sequence[Example], batch_size: int = 8, max_new_tokens: int = 32,
                   progress: bool = True) -> list[Reference]:
    """The unpruned model's greedy responses, one `Reference` per batch of `batch_size`."""
    out = []
    for batch in tqdm(_batches(examples, batch_size), desc="full model", disable=not progress, leave=False):
        inputs = _inputs(pm, batch)
        seq = pm.generate(**inputs, max_new_tokens=max_new_tokens)
        out.append(_response(pm, seq, inputs["input_ids"].shape[1]))
    return out


@torch.no_grad()
def evaluate_answers(
    pm: PrunedModel,
    examples: Sequence[Example],
    prune: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    reference: Sequence[Reference] | None = None,
    progress: bool = True,
) -> AnswersResult:
    """Generate answers for `examples` under `prune` and compare them with the full model's and the data's."""
    batches = _batches(examples, batch_size)
    if reference is None:
        reference = full_responses(pm, examples, batch_size, max_new_tokens, progress)
    if len(reference) != len(batches):
        raise ValueError("reference was computed with another batch size or dataset")
    records: list[dict] = []
    totals = RunTotals()
    for batch, ref in tqdm(list(zip(batches, reference)), desc="eval", disable=not progress, leave=False):
        inputs = _inputs(pm, batch)
        res = pm.generate(**inputs, prune=prune, max_new_tokens=max_new_tokens, return_dict=True)
        mine = _response(pm, res.sequences, inputs["input_ids"].shape[1])
        kl = _response_kl(pm, inputs, ref, prune)
        for ex, own, full, k in zip(batch, mine.texts, ref.texts, kl.tolist()):
            correct = None if ex.answer is None else normalize_answer(own) == normalize_answer(ex.answer)
            records.append(dict(origin=ex.origin, prompt=ex.prompt, answer=own, full_answer=full, reference=ex.answer,
                                agrees=own == full, correct=correct, kl=k))
        totals.add(pm, res.stats, inputs, res.prefill_seconds, res.decode_seconds, res.decode_steps)
    n = len(records)
    answered = [r["correct"] for r in records if r["correct"] is not None]
    return AnswersResult(
        n=n,
        agreement=sum(r["agrees"] for r in records) / n,
        mean_kl=sum(r["kl"] for r in records) / n,
        accuracy=sum(answered) / len(answered) if answered else None,
        n_answers=len(answered),
        **totals.means(),
        samples=records,
    )


def _response_kl(pm: PrunedModel, inputs: dict, ref: Reference, prune: Any) -> torch.Tensor:
    """``[B]`` KL(full || pruned) per response token of the full model's response, averaged over it."""
    full, _ = pm.score_response(**inputs, response=ref.tokens)
    pruned = full if prune is None else pm.score_response(**inputs, response=ref.tokens, prune=prune)[0]
    kl = (full.exp() * (full - pruned)).sum(-1).clamp(min=0)  # (B, N)
    valid = torch.arange(ref.tokens.shape[1])[None, :] < ref.lengths[:, None]
    return (kl.cpu() * valid).sum(1) / valid.sum(1).clamp(min=1)


def format_answers(result: AnswersResult, label: str = "") -> str:
    acc = "n/a (no reference answers)" if result.accuracy is None else f"{result.accuracy * 100:.1f}% on {result.n_answers}"
    return "\n".join([
        f"{label + ': ' if label else ''}{result.n} samples: agreement with the full model {result.agreement * 100:.1f}%, "
        f"mean KL {result.mean_kl:.4f}, accuracy {acc}",
        f"visual tokens {result.visual_tokens_in:.0f} -> {result.visual_tokens_kept:.1f}, layers run {result.layers_run:.2f}, "
        f"LM prefill {result.lm_tflops * 1e3:.3f} GFLOPs/sample ({result.lm_share:.3f} of full), total {result.tflops * 1e3:.3f} GFLOPs, "
        f"prefill {result.prefill_ms_per_sample:.2f} ms/sample, decode {result.decode_ms_per_token:.2f} ms/token",
    ])
