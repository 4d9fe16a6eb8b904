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

The teacher's signal is its whole greedy response (`Response`, up to `RouterTrainConfig.response_tokens`
tokens, EOS included): a flow's KL is the mean over the response tokens of KL(full || pruned) at the
position predicting each token, both models teacher-forced over prompt + response (`ForcedInputs`) in
one batched prefill; the visual tokens are pruned, the response tokens always kept. The router still
reads the prompt alone: it decides before the response exists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ...engine.plan import Plan
from ...engine.runner import PrefillResult, prefill
from ...errors import VlmpruneError
from ...models.base import PreparedInputs
from ..base import last_token_attention
from ..tiles import balanced_scores
from .router import RouterOutput

NOISE_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0, float("inf"))  # inf: a uniformly random selection
LAYER_EXPLORATION_SCALES = (1.0, float("inf"))  # cycled over the layer-exploration flows


@dataclass
class Response:
    """The frozen model's greedy response to each prompt of a batch: ``ids [B, T]`` (T at most the
    tokens asked for; slots after a sample's first EOS are padding) and ``lengths [B]``, each sample's
    tokens up to and including its first EOS (T where it has none)."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``[B, T]`` bool: the response tokens that count (EOS included, padding after it not)."""
        return torch.arange(self.ids.shape[1], device=self.ids.device) < self.lengths[:, None].to(self.ids.device)


@torch.no_grad()
def greedy_response(pm, inputs: dict, max_tokens: int) -> Response:
    """The unpruned model's greedy response of up to `max_tokens` tokens to a batch of model inputs
    (stops at the generation config's EOS; `PrunedModel.generate`, no pruning)."""
    out = pm.generate(**inputs, max_new_tokens=max_tokens, return_dict=True)
    ids = out.sequences[:, inputs["input_ids"].shape[1]:]
    eos = torch.tensor(pm.eos_ids(), dtype=torch.long, device=ids.device)
    is_eos = torch.isin(ids, eos)
    first = torch.where(is_eos, torch.arange(ids.shape[1], device=ids.device), ids.shape[1]).amin(1)
    lengths = torch.where(is_eos.any(1), first + 1, torch.full_like(first, ids.shape[1]))
    return Response(ids.cpu(), lengths.cpu())


@dataclass
class ForcedInputs:
    """A prompt batch with each sample's response appended for teacher forcing: ``prep`` holds the
    prompt as given (left-padded or not) followed by the response's first T - 1 tokens on the right
    (the last token predicts nothing; slots past a short response are padding, attention mask 0), at
    positions continuing from each prompt's `next_position` as decoding would. ``rows [B, T]``: the
    index in ``prep`` of the token whose logits predict response token t (the prompt's last real token
    for t = 0); ``mask [B, T]``: the response tokens that count."""

    prep: PreparedInputs
    rows: torch.Tensor
    mask: torch.Tensor

    def repeat(self, repeats: int) -> "ForcedInputs":
        """Each sample `repeats` times in a row, like `repeat_prepared`."""
        if repeats == 1:
            return self
        return ForcedInputs(repeat_prepared(self.prep, repeats), self.rows.repeat_interleave(repeats, 0),
                            self.mask.repeat_interleave(repeats, 0))


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, -1).amax(1)


def forced_inputs(pm, prep: PreparedInputs, response: Response | None = None) -> ForcedInputs:
    """`ForcedInputs` for `prep` (a prompt batch) and its `response`; without one, only the first
    token after the prompt is predicted (``prep`` unchanged, T = 1)."""
    batch, length = prep.input_ids.shape
    device = prep.input_ids.device
    last = _last_real(prep.attention_mask)
    if response is None:
        return ForcedInputs(prep, last[:, None], torch.ones(batch, 1, dtype=torch.bool, device=device))
    n = response.ids.shape[1]
    ids = response.ids[:, : n - 1].to(device)
    fed = torch.arange(n - 1, device=device) < (response.lengths.to(device) - 1)[:, None]  # inputs that predict a counted token
    rows = torch.cat([last[:, None], length + torch.arange(n - 1, device=device).expand(batch, -1)], 1)
    mask = response.mask.to(device)
    if n == 1:
        return ForcedInputs(prep, rows, mask)
    embeds = pm.adapter.decoder.embed_tokens(ids).to(prep.inputs_embeds.dtype)
    steps = prep.next_position[:, None] + torch.arange(n - 1, device=device)  # [B, T - 1], as decode_step counts
    positions = steps[None].expand(prep.position_ids.shape[0], -1, -1).to(prep.position_ids.dtype)
    extended = replace(
        prep,
        input_ids=torch.cat([prep.input_ids, ids], 1),
        inputs_embeds=torch.cat([prep.inputs_embeds, embeds], 1),
        position_ids=torch.cat([prep.position_ids, positions], 2),
        attention_mask=torch.cat([prep.attention_mask, fed], 1),
        visual_mask=torch.cat([prep.visual_mask, torch.zeros_like(fed)], 1),
    )
    return ForcedInputs(extended, rows, mask)


def response_log_probs(res: PrefillResult, forced: ForcedInputs) -> torch.Tensor:
    """``[B, T, V]`` float32 log-probabilities at the rows predicting each response token, from a
    ``prefill(..., logits_to_keep=0)`` over ``forced.prep`` (rows found through ``res.token_index``,
    since dropped visual tokens leave the sequence); rows outside ``forced.mask`` are arbitrary."""
    batch, length = forced.prep.input_ids.shape
    present = res.token_index >= 0
    slot = torch.full((batch, length), -1, dtype=torch.long, device=res.token_index.device)
    b_idx, t_idx = present.nonzero(as_tuple=True)
    slot[b_idx, res.token_index[b_idx, t_idx]] = t_idx
    where = slot.gather(1, forced.rows.to(slot.device))
    if bool(((where < 0) & forced.mask.to(where.device)).any()):
        raise VlmpruneError("a token that predicts the response did not reach the head; only visual tokens may be dropped")
    logits = res.logits.gather(1, where.clamp(min=0)[..., None].expand(-1, -1, res.logits.shape[-1]))
    return logits.float().log_softmax(-1)


@dataclass
class Teacher:
    """The unpruned model on one batch: ``log_probs [B, T, V]`` at the positions predicting each
    token of its response (teacher-forced over prompt + response; T = 1 and the next token after the
    prompt without a response), ``response_mask [B, T]`` the tokens that count, ``token_scores [B, Vmax]``
    the prompt's last token's attention to each visual token in `score_layer` (mean over heads; -inf
    past a sample's count), ``layer_scores [B, n_layers]`` each layer's Block Influence
    ``1 - cos(input, output)`` over the prompt, and ``hidden [B, L, D]`` the prompt's input hidden
    states of the router's token layer (what the router reads)."""

    log_probs: torch.Tensor
    token_scores: torch.Tensor
    layer_scores: torch.Tensor
    hidden: torch.Tensor
    response_mask: torch.Tensor


class _AttentionRecorder:
    """An in-model policy that keeps every token and records the last token's attention of the layer before."""

    def __init__(self, layer: int) -> None:
        self.layers = (layer,)
        self.scores: torch.Tensor | None = None

    def select(self, layer, view):
        self.scores = last_token_attention(view)
        return [torch.arange(int(n), device=self.scores.device) for n in view.state.visual_counts()]


@torch.no_grad()
def teacher_pass(pm, prep: PreparedInputs, score_layer: int = 1, token_layer: int = 0, forced: ForcedInputs | None = None) -> Teacher:
    """Run the unpruned model over the prompts, recording what the candidate flows and the router
    need; with `forced` (`forced_inputs` of `prep` and a response), a second unpruned pass over
    prompt + response gives the teacher's distribution at every response position."""
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
    if forced is None:
        log_probs, mask = res.last_logits.float().log_softmax(-1)[:, None], torch.ones(batch, 1, dtype=torch.bool)
    else:
        log_probs, mask = response_log_probs(prefill(pm.adapter, forced.prep, Plan(), logits_to_keep=0), forced), forced.mask
    return Teacher(log_probs, scores, (1 - sums / counts.clamp(min=1)).float(), seen[token_layer], mask)


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
def flow_kl(pm, inputs: ForcedInputs | PreparedInputs, plan: Plan, teacher_log_probs: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """``[N * repeats]`` KL(teacher || pruned) for each row of the batch run `repeats` times in a row
    under `plan` (rows ``b * repeats ..`` are sample b's flows), averaged over the response tokens of
    `inputs` (`ForcedInputs`; a `PreparedInputs` prompt batch: the next token only), in one prefill
    with the plan's visual tokens pruned and the response kept. `teacher_log_probs`: ``[N, T, V]``
    (``[N, V]`` for the next token)."""
    forced = inputs if isinstance(inputs, ForcedInputs) else forced_inputs(pm, inputs)
    teacher = teacher_log_probs if teacher_log_probs.dim() == 3 else teacher_log_probs[:, None]
    run = forced.repeat(repeats)
    res = prefill(pm.adapter, run.prep, plan, logits_to_keep=0)
    n, t, v = teacher.shape
    pruned = response_log_probs(res, run).view(n, repeats, t, v)
    target = teacher.to(pruned.device)[:, None]
    kl = (target.exp() * (target - pruned)).sum(-1).clamp(min=0)  # [N, repeats, T]
    mask = forced.mask.to(kl.device)[:, None].float()
    return ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).flatten()
