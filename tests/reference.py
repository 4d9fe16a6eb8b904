"""Independent references built on the unmodified transformers model (no engine code).

A physical drop from layer K is compared with the full model in which the dropped tokens are masked
out of attention from layer K on; a skipped layer with the full model in which that layer is the
identity. Decoding is re-run over the whole sequence each step (no KV cache at all).
"""

from __future__ import annotations

import torch

from conftest import IMAGE_TOKEN, Batch


def _hf_inputs(family: str, ids: torch.Tensor, mask: torch.Tensor, vision: dict) -> dict:
    kw = dict(input_ids=ids, attention_mask=mask, **vision)
    if family.startswith("qwen"):
        kw["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    else:
        kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return kw


def masked_logits(model, family: str, ids, mask, vision, dropped: torch.Tensor, drop_from: int, skip=()):
    """Logits ``[B, L, V]`` of the full model; `dropped [B, L]` tokens are hidden from layers >= drop_from."""
    length = ids.shape[1]
    valid = mask.bool()
    eye = torch.eye(length, dtype=torch.bool)
    base = (torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, :]) | eye
    pruned = (base & ~dropped[:, None, :]) | eye
    layers = model.model.language_model.layers
    handles = []
    for i, layer in enumerate(layers):
        allowed = (pruned if i >= drop_from else base)[:, None]

        def set_mask(module, args, kwargs, allowed=allowed):
            kwargs["attention_mask"] = allowed
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(set_mask, with_kwargs=True))
        if i in skip:
            identity = lambda module, args, kwargs, output: args[0] if args else kwargs["hidden_states"]
            handles.append(layer.register_forward_hook(identity, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**_hf_inputs(family, ids, mask, vision), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def dropped_mask(batch: Batch, keep: list[torch.Tensor]) -> torch.Tensor:
    """[B, L] True for visual tokens not in each sample's kept indices."""
    visual = batch.input_ids == IMAGE_TOKEN
    out = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        pos = visual[b].nonzero().squeeze(1)
        gone = torch.ones(pos.numel(), dtype=torch.bool)
        gone[keep[b]] = False
        out[b, pos[gone]] = True
    return out


def greedy_reference(model, family, batch: Batch, keep, drop_from: int, skip=(), steps: int = 8):
    """Greedy tokens and per-step last-token logits of the masked/identity reference (left padding)."""
    ids, mask = batch.input_ids, batch.attention_mask
    dropped = dropped_mask(batch, keep) if keep is not None else torch.zeros_like(ids, dtype=torch.bool)
    tokens, scores = [], []
    for _ in range(steps):
        logits = masked_logits(model, family, ids, mask, batch.vision, dropped, drop_from, skip)[:, -1]
        token = logits.argmax(-1)
        scores.append(logits)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        dropped = torch.cat([dropped, torch.zeros_like(dropped[:, :1])], 1)
    return torch.stack(tokens, 1), scores


def masked_attentions(eager_model, family: str, batch: Batch, dropped_from: dict[int, torch.Tensor]):
    """Eager attention maps of the full model in which the tokens `dropped_from[K]` ``[B, L]`` are masked out
    of attention from layer K on (masks accumulate over stages)."""
    ids, mask = batch.input_ids, batch.attention_mask
    length = ids.shape[1]
    valid = mask.bool()
    eye = torch.eye(length, dtype=torch.bool)
    allowed = (torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, :]) | eye
    handles = []
    dropped = torch.zeros_like(valid)
    for i, layer in enumerate(eager_model.model.language_model.layers):
        if i in dropped_from:
            dropped = dropped | dropped_from[i]
        layer_mask = ((allowed & ~dropped[:, None, :]) | eye)[:, None]
        additive = torch.zeros(layer_mask.shape).masked_fill(~layer_mask, torch.finfo(torch.float32).min)

        def set_mask(module, args, kwargs, additive=additive):
            kwargs["attention_mask"] = additive
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(set_mask, with_kwargs=True))
    try:
        with torch.no_grad():
            return eager_model(**_hf_inputs(family, ids, mask, batch.vision), output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
