"""Analytic FLOPs of a language-model prefill, priced from what the engine actually ran.

Per decoder layer that runs over ``n`` tokens (hidden ``d``, ``H`` query heads and ``Hkv`` key/value
heads of size ``hd``, SwiGLU width ``m``), counted as multiply-adds (MACs):

    q, o projections      2 * n * d * H*hd
    k, v projections      2 * n * d * Hkv*hd
    scores  q k^T         n * n * H*hd        (the full n x n block, as sdpa and FlopCounterMode count it)
    values  p v           n * n * H*hd
    SwiGLU MLP            3 * n * d * m

plus the LM head for the rows that reach it. FLOPs = 2 * MACs (the convention of
`torch.utils.flop_counter.FlopCounterMode`). Norms, RoPE, softmax and residual adds are left out.
"""

from __future__ import annotations

import torch

from ..engine.stats import RunStats


def layer_macs(text_config, n_tokens: torch.Tensor) -> torch.Tensor:
    """MACs of one decoder layer run over ``n_tokens`` (any shape of integer counts)."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    m = text_config.intermediate_size
    n = n_tokens.to(torch.float64)
    proj = 2 * n * d * heads * head_dim + 2 * n * d * kv_heads * head_dim
    attn = 2 * n * n * heads * head_dim
    mlp = 3 * n * d * m
    return proj + attn + mlp


def prefill_flops(text_config, stats: RunStats, head_rows: int | torch.Tensor = 1) -> torch.Tensor:
    """``[B]`` FLOPs of each sample's language-model prefill: the layers it ran plus `head_rows` LM-head rows."""
    per_layer = layer_macs(text_config, stats.tokens) * stats.layers_run
    head = torch.as_tensor(head_rows, dtype=torch.float64) * text_config.hidden_size * text_config.vocab_size
    return 2 * (per_layer.sum(1) + head)
