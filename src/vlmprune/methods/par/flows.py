"""PAR's self-supervised signal: the unpruned model as teacher, candidate pruning flows, and each
flow's KL divergence from the teacher, computed through the engine (physically pruned, batched).

A flow is one selection per sample: a boolean mask over its visual tokens (kept from the router's
token layer on) and one over the decoder layers (run or skipped; the layers before the token layer
always run). Candidates come from the teacher's attention (visual tokens, selected under the router's
own tile-balanced rule, so every flow is one the router could choose) and Block Influence (layers)
perturbed by Gumbel noise of several scales,
from the current router (its top-k and Gumbel-top-k samples of its logits), from stratified
random samples of the visual tokens (one random token per tile of the image grid, with the teacher's
layers): flows that differ only in *which* token of each tile survives, so their KLs credit single
positions instead of the image coverage that dominates the other candidates' differences; and from
layer explorations: the router's own tokens with perturbed or random layer sets. Block Influence is
measured on the unpruned model, but which layers matter changes once tokens are gone; flows that
differ from the router's own only in their layers credit layers under the token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ...engine.runner import prefill
from ...models.base import PreparedInputs
from ..base import last_token_attention
from ..tiles import balanced_scores
from .router import RouterOutput

NOISE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, float("inf"))  # inf: a uniformly random selection
LAYER_EXPLORATION_SCALES = (1.0, float("inf"))  # cycled over the layer-exploration flows


@dataclass
class Teacher:
    """The unpruned model on one batch: ``log_probs [B, V]`` of the next token (the answer's first
    token, which the teacher's greedy answer is), ``token_scores [B, Vmax]`` the last token's attention
    to each visual token in `score_layer` (mean over heads; -inf past a sample's count), and
    ``layer_scores [B, n_layers]`` each layer's Block Influence ``1 - cos(input, output)``, and
    ``hidden [B, L, D]`` the input hidden states of the router's token layer (what the router reads)."""

    log_probs: torch.Tensor
    token_scores: torch.Tensor
    layer_scores: torch.Tensor
    hidden: torch.Tensor


class _AttentionRecorder:
    """An in-model policy that keeps every token and records the last token's attention of the layer before."""

    def __init__(self, layer: int) -> None:
        self.layers = (layer,)
        self.scores: torch.Tensor | None = None

    def select(self, layer, view):
        self.scores = last_token_attention(view)
        return [torch.arange(int(n), device=self.scores.device) for n in view.state.visual_counts()]


@torch.no_grad()
def teacher_pass(pm, prep: PreparedInputs, score_layer: int = 1, token_layer: int = 0) -> Teacher:
    """Run the unpruned model once, recording what the candidate flows and the router need."""
    batch, n_layers = prep.input_ids.shape[0], pm.n_layers
    recorder = _AttentionRecorder(min(score_layer + 1, n_layers - 1))
    sums = torch.zeros(batch, n_layers, dtype=torch.float64)
    counts = torch.zeros(batch, n_layers, dtype=torch.float64)
    seen = {0: prep.inputs_embeds}

    def observe(layer, hidden_in, hidden_out, valid):
        if layer == token_layer:
            seen[layer] = hidden_in
        cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1).masked_fill(~valid, 0)
        sums[:, layer] += cos.sum(1).double().cpu()
        counts[:, layer] += valid.sum(1).double().cpu()

    res = prefill(pm.adapter, prep, Plan(), [recorder], logits_to_keep=1, observers=[observe])
    scores = recorder.scores.float()
    width = max(prep.n_visual)
    if scores.shape[1] < width:
        scores = F.pad(scores, (0, width - scores.shape[1]), value=float("-inf"))
    return Teacher(res.last_logits.float().log_softmax(-1), scores, (1 - sums / counts.clamp(min=1)).float(), seen[token_layer])


def repeat_prepared(prep: PreparedInputs, repeats: int) -> PreparedInputs:
    """Each sample of the batch `repeats` times in a row (sample b's copies at ``b*repeats ..``)."""
    index = torch.arange(prep.input_ids.shape[0], device=prep.input_ids.device).repeat_interleave(repeats)
    grids = None if prep.visual_grids is None else [prep.visual_grids[i] for i in index.tolist()]
    return replace(
        prep,
        input_ids=prep.input_ids[index],
        inputs_embeds=prep.inputs_embeds[index],
        position_ids=prep.position_ids[:, index],
        attention_mask=prep.attention_mask[index],
        visual_mask=prep.visual_mask[index],
        visual_grids=grids,
        vision_record=None,
    )


def top_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bool: the top ``k[...]`` entries of each row of `scores` (-inf entries last)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < k[..., None]


def gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def perturbed(base: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`base` plus Gumbel noise times `scale`; pure noise (a uniformly random top-k) at ``scale = inf``."""
    noise = gumbel(base.shape, generator).to(base.device)
    return noise if scale == float("inf") else base + scale * noise


def _standardize(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log scores scaled to unit spread per row (so noise scales mean the same for every sample)."""
    logs = scores.clamp(min=1e-12).log().masked_fill(~valid, 0)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = logs.sum(-1, keepdim=True) / n
    std = (((logs - mean) ** 2).masked_fill(~valid, 0).sum(-1, keepdim=True) / n).sqrt().clamp(min=1e-6)
    return ((logs - mean) / std).masked_fill(~valid, float("-inf"))


def stratified_scores(n_visual: list[int], grids, keep: torch.Tensor, generator: torch.Generator, width: int) -> torch.Tensor:
    """``[B, width]`` scores whose top-``keep[b]`` is a stratified random sample of sample b's visual
    tokens: one random token of every tile (`methods.tiles.tiles`) before a second of any."""
    return balanced_scores(torch.rand(len(n_visual), width, generator=generator), n_visual, grids, keep)


def candidate_masks(
    teacher: Teacher,
    router: RouterOutput,
    keep_tokens: torch.Tensor,
    keep_layers: torch.Tensor,
    router_samples: int,
    generator: torch.Generator,
    stratified: int = 0,
    layer_flows: int = 0,
    token_layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, C, Vmax], layers [B, C, n_layers])`` bool masks of C candidate flows per sample:
    one per `NOISE_SCALES` from the teacher's scores, the router's own selection (at index
    ``len(NOISE_SCALES)``), `router_samples` selections from Gumbel-perturbed router logits, and
    `stratified` stratified random token samples with the teacher's top layers, and `layer_flows`
    flows of the router's own tokens with layers from Block Influence plus Gumbel noise of the
    `LAYER_EXPLORATION_SCALES` in turn. Layers before `token_layer` run in every flow.
    `keep_tokens` / `keep_layers` ``[B]``: counts to keep."""
    token_logits, layer_logits = router.token_logits.detach(), router.layer_logits.detach()
    valid = torch.isfinite(token_logits)
    t_base = _standardize(teacher.token_scores.clamp(min=0), valid)
    l_base = _standardize(teacher.layer_scores.clamp(min=0), torch.ones_like(teacher.layer_scores, dtype=torch.bool))
    tokens, layers = [], []
    for scale in NOISE_SCALES:  # under the router's own selection rule (tile-balanced by default)
        tokens.append(router.selection_scores(keep_tokens, perturbed(t_base, scale, generator).masked_fill(~valid, float("-inf"))))
        layers.append(perturbed(l_base, scale, generator))
    tokens.append(router.selection_scores(keep_tokens))
    layers.append(layer_logits)
    for _ in range(router_samples):
        tokens.append(router.selection_scores(keep_tokens, perturbed(token_logits, 1.0, generator)))
        layers.append(perturbed(layer_logits, 1.0, generator))
    for _ in range(stratified):
        tokens.append(stratified_scores(router.n_visual, router.grids, keep_tokens, generator, valid.shape[1]).to(token_logits.device))
        layers.append(l_base)
    for i in range(layer_flows):
        tokens.append(tokens[len(NOISE_SCALES)])
        layers.append(perturbed(l_base, LAYER_EXPLORATION_SCALES[i % len(LAYER_EXPLORATION_SCALES)], generator))
    t_scores, l_scores = torch.stack(tokens, 1), torch.stack(layers, 1)
    l_scores[..., :token_layer] = float("inf")
    token_masks = top_mask(t_scores, keep_tokens[:, None].expand(-1, t_scores.shape[1])) & valid[:, None]
    layer_masks = top_mask(l_scores, keep_layers[:, None].expand(-1, l_scores.shape[1]))
    return token_masks, layer_masks


def plan_from_masks(token_masks: torch.Tensor, layer_masks: torch.Tensor, token_layer: int) -> Plan:
    """One plan row per flow (``[N, Vmax]`` / ``[N, n_layers]`` masks): kept visual tokens from
    `token_layer` on, skipped layers."""
    keep = {token_layer: [row.nonzero().squeeze(1).cpu() for row in token_masks]}
    skip = [(~row).nonzero().squeeze(1).tolist() for row in layer_masks]
    return Plan(keep=keep, skip=skip)


@torch.no_grad()
def flow_kl(pm, prep: PreparedInputs, plan: Plan, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """``[N]`` KL(teacher || pruned) of the next-token distribution for each row of a (repeated) batch
    run under `plan`."""
    res = prefill(pm.adapter, prep, plan, logits_to_keep=1)
    pruned = res.last_logits.float().log_softmax(-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - pruned)).sum(-1).clamp(min=0)
