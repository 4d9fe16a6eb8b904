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


def staged_forward(model, family: str, ids, mask, vision, drops: dict[int, torch.Tensor], skip=(), **kwargs):
    """The unmodified model in which the tokens ``drops[K] [B, L]`` are masked out of attention from layer K on
    (accumulating over stages) and the layers in `skip` are the identity. Masks are bool under sdpa and
    additive under eager attention."""
    length = ids.shape[1]
    eye = torch.eye(length, dtype=torch.bool)
    base = (torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, :]) | eye
    eager = model.config.get_text_config()._attn_implementation == "eager"
    dropped = torch.zeros(ids.shape, dtype=torch.bool)
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        if i in drops:
            dropped = dropped | drops[i]
        allowed = ((base & ~dropped[:, None, :]) | eye)[:, None]
        layer_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if eager else allowed

        def set_mask(module, args, kw, layer_mask=layer_mask):
            kw["attention_mask"] = layer_mask
            return args, kw

        handles.append(layer.register_forward_pre_hook(set_mask, with_kwargs=True))
        if i in skip:
            identity = lambda module, args, kw, output: args[0] if args else kw["hidden_states"]
            handles.append(layer.register_forward_hook(identity, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**_hf_inputs(family, ids, mask, vision), use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()


def masked_logits(model, family: str, ids, mask, vision, dropped: torch.Tensor, drop_from: int, skip=()):
    """Logits ``[B, L, V]`` of the full model; `dropped [B, L]` tokens are hidden from layers >= drop_from."""
    return staged_forward(model, family, ids, mask, vision, {drop_from: dropped}, skip).logits


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
    return staged_forward(eager_model, family, ids, mask, batch.vision, dropped_from, output_attentions=True).attentions
