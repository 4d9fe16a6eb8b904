"""Perplexity of a causal LM on held-out text: the **end** of CPython's ``pydoc_data.topics`` token
stream, disjoint from the calibration slice that weight pruning reads from its start
(`data.calibration.text_batches`).

    batches = heldout_batches(tokenizer, n=32, seq_len=256, calibration_tokens=128 * 128)
    print(perplexity(model, batches))   # exp(mean next-token negative log-likelihood)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import VlmpruneError
from ..data.calibration import token_rows, topic_token_ids


def heldout_batches(tokenizer, n: int, seq_len: int = 256, batch_size: int = 8, calibration_tokens: int = 0) -> list[dict]:
    """`n` rows of `seq_len` tokens from the end of the topics text; refuses to overlap the first
    `calibration_tokens` tokens (the calibration slice)."""
    ids = topic_token_ids(tokenizer)
    need = n * seq_len
    if need + calibration_tokens > len(ids):
        raise VlmpruneError(
            f"{n} x {seq_len} held-out tokens and {calibration_tokens} calibration tokens overlap in the "
            f"{len(ids)}-token text; evaluate fewer rows or calibrate on fewer samples"
        )
    return token_rows(ids[len(ids) - need :], n, seq_len, batch_size)


def token_nll(model: nn.Module, batch: Mapping) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens) over the batch; a token
    is predicted where it and the one before it are both unmasked. Positions come from the attention
    mask (as transformers' generate does), so a padded row scores as it does alone."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False).logits[:, :-1].float()
    target = ids[:, 1:]
    valid = mask[:, 1:] & mask[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return float(nll[valid.reshape(-1)].sum()), int(valid.sum())


def perplexity(model: nn.Module, batches: Sequence[Mapping], progress: bool = False) -> float:
    """exp(total negative log-likelihood / predicted tokens) over all batches (token-weighted)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
            nll, n = token_nll(model, batch)
            total, count = total + nll, count + n
    if count == 0:
        raise VlmpruneError("the evaluation batches predict no token (every row masked or one token long)")
    return math.exp(total / count)
