"""Self-supervised training of PAR's router: the frozen LVLM's own greedy response (up to
`response_tokens` tokens, generated once per training batch and cached in ``OUT/teacher``) is the
teacher; candidate pruning flows are scored by KL(unpruned || pruned) averaged over the response's
tokens, teacher-forced through the engine (`flows.flow_kl`); the router
learns to prefer low-KL flows (a reference-free DPO-style preference loss on its log-likelihood of a
selection) while regularisers hold its expected budget; an auxiliary loss (`attention_weight`, on by
default, not in the paper) distils the teacher's attention ranking into the token logits.
``loss="distill"`` instead regresses the router on the best candidate (the ablation).

Selections are scored as independent Bernoulli choices, so the log-likelihood gap of two selections
of equal size is the sum of the router's logits over what only the winner keeps minus what only the
loser keeps; it is divided by the number of swapped items so one `beta` serves every budget.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ...data.calibration import training_scenes
from ...errors import VlmpruneError
from ...training import ResumableRun, step_seed
from .checkpoint import CONFIG, save_router
from ..base import keep_count, layer_count
from .flows import NOISE_SCALES, Response, candidate_masks, flow_kl, forced_inputs, greedy_response, plan_from_masks, teacher_pass
from .router import Router, RouterConfig

LOSSES = ("preference", "distill")
TOKEN_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # visual-token shares sampled in training (plus the requested one)
LAYER_BUDGETS = (0.5, 0.67, 0.83)  # shares of decoder layers (plus the requested one)
SCENES_SEED_OFFSET = 7  # step s's training scenes: seed `step_seed(seed, s) + 7` (its budget draws: `step_seed(seed, s)`)


@dataclass(frozen=True)
class RouterTrainConfig:
    """`tokens` / `layers`: the shares the router is trained for; with `sample_budgets` it also sees
    `TOKEN_BUDGETS` x `LAYER_BUDGETS`, token-only (layers 1) and layer-only (tokens 1) budgets, so one
    router serves every version. `router_samples`, `stratified`, `layer_flows`: how many of each kind of
    candidate flow (`flows.candidate_masks`) join the teacher-based ones (one per `flows.NOISE_SCALES`)
    and the router's own top-k. `token_layer`: the layer K whose input hidden states the router reads
    and from which dropped tokens are gone (the paper uses K = 2). `attention_weight`: the weight of an
    auxiliary loss beside the preference loss, the cross-entropy of the router's token distribution
    against the teacher's `score_layer` attention (`attention_loss`; not in the paper: without it the
    testbed router learned no token choice beyond its tile rule, see README "PAR"); 0 turns it off.
    `response_tokens`: the teacher is the frozen model's greedy response of up to this many tokens
    (stopping at EOS), and a flow's KL is averaged over its tokens; 1 is the first answer token only."""

    out: str
    model: str = "testbed"
    data: str = "testbed"  # the training prompts' source (recorded; a resumed run must use the same)
    tokens: float = 0.25
    layers: float = 0.75
    sample_budgets: bool = True
    steps: int = 300
    batch_size: int = 8
    router_samples: int = 2
    stratified: int = 4
    layer_flows: int = 2
    loss: str = "preference"
    beta: float = 2.0
    margin: float = 0.05
    budget_weight: float = 1.0
    attention_weight: float = 1.0
    response_tokens: int = 32
    lr: float = 3e-3
    width: int = 64
    depth: int = 1
    heads: int = 4
    ffn: int = 128
    token_layer: int = 1
    score_layer: int = 1
    seed: int = 0
    save_every: int = 50
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("tokens", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise VlmpruneError(f"--{name} {value!r} is outside (0, 1]: the share kept, e.g. 0.25")
        if self.loss not in LOSSES:
            raise VlmpruneError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("steps", "batch_size", "save_every", "log_every", "response_tokens"):
            if getattr(self, name) < 1:
                raise VlmpruneError(f"{name} must be >= 1, got {getattr(self, name)}")

    def budgets(self) -> list[tuple[float, float]]:
        """The (token share, layer share) pairs sampled in training."""
        if not self.sample_budgets:
            return [(self.tokens, self.layers)]
        tokens = sorted({*TOKEN_BUDGETS, self.tokens})
        layers = sorted({*LAYER_BUDGETS, self.layers})
        pairs = {(t, l) for t in tokens for l in layers} | {(t, 1.0) for t in tokens} | {(1.0, l) for l in layers}
        return sorted(pairs - {(1.0, 1.0)})


def selection_gap(logits: torch.Tensor, win: torch.Tensor, lose: torch.Tensor) -> torch.Tensor:
    """Mean logit of what only `win` keeps minus what only `lose` keeps (the Bernoulli log-likelihood
    gap over the number of swapped items); 0 where the selections agree. Shapes ``[..., n]``."""
    safe = logits.masked_fill(~torch.isfinite(logits), 0)
    diff = ((win.float() - lose.float()) * safe).sum(-1)
    swapped = (win ^ lose).sum(-1).float() / 2
    return diff / swapped.clamp(min=1)


def preference_loss(token_logits, layer_logits, token_masks, layer_masks, kl, beta: float, margin: float) -> torch.Tensor:
    """``-log sigmoid(beta * gap)`` over every pair of a sample's candidates whose KLs differ by more than
    a relative `margin` (the lower-KL one is the winner)."""
    c = kl.shape[1]
    i, j = torch.triu_indices(c, c, 1)
    better = kl[:, i] < kl[:, j]
    distinct = (kl[:, i] - kl[:, j]).abs() > margin * torch.maximum(kl[:, i], kl[:, j]) + 1e-6
    win_i = better[..., None]
    tw = torch.where(win_i, token_masks[:, i], token_masks[:, j])
    tl = torch.where(win_i, token_masks[:, j], token_masks[:, i])
    lw = torch.where(win_i, layer_masks[:, i], layer_masks[:, j])
    ll = torch.where(win_i, layer_masks[:, j], layer_masks[:, i])
    gap = selection_gap(token_logits[:, None], tw, tl) + selection_gap(layer_logits[:, None], lw, ll)
    losses = -F.logsigmoid(beta * gap)
    weights = distinct.float()
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def distill_loss(token_logits, layer_logits, token_masks, layer_masks, kl) -> torch.Tensor:
    """Binary cross-entropy of the router's logits against the lowest-KL candidate's selection."""
    best = kl.argmin(1)
    b = torch.arange(kl.shape[0])
    valid = torch.isfinite(token_logits)
    t = F.binary_cross_entropy_with_logits(token_logits.masked_fill(~valid, 0), token_masks[b, best].float(), reduction="none")
    l = F.binary_cross_entropy_with_logits(layer_logits, layer_masks[b, best].float())
    return (t * valid).sum() / valid.sum().clamp(min=1) + l


def attention_loss(token_logits: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Listwise distillation of the teacher's attention ranking: per sample, the cross-entropy of the
    softmax of the router's token logits against the teacher's attention to each visual token
    (`flows.Teacher.token_scores`, normalised over the sample's visual tokens). Shapes ``[B, V]``."""
    valid = torch.isfinite(token_logits)
    target = teacher_scores.clamp(min=0).masked_fill(~valid, 0)
    target = target / target.sum(1, keepdim=True).clamp(min=1e-12)
    log_p = token_logits.masked_fill(~valid, float("-inf")).log_softmax(1).masked_fill(~valid, 0)
    return -(target * log_p).sum(1).mean()


def budget_loss(token_logits, layer_logits, token_share, layer_share) -> torch.Tensor:
    """Squared gap between the router's expected kept share (mean sigmoid) and the requested one."""
    valid = torch.isfinite(token_logits)
    probs = torch.sigmoid(token_logits.masked_fill(~valid, 0)) * valid
    expected_tokens = probs.sum(1) / valid.sum(1).clamp(min=1)
    expected_layers = torch.sigmoid(layer_logits).mean(1)
    return ((expected_tokens - token_share) ** 2).mean() + ((expected_layers - layer_share) ** 2).mean()


def _training_samples(cfg: RouterTrainConfig, step: int, tokenizer):
    from ...testbed.encode import encode

    return encode(training_scenes(cfg.batch_size, step_seed(cfg.seed, step) + SCENES_SEED_OFFSET), tokenizer)


def _digest(pm, inputs: dict, response_tokens: int) -> str:
    """A fingerprint of a teacher response's inputs: the model's config, the batch's tensors, the length asked for."""
    h = hashlib.sha256(pm.config.to_json_string().encode())
    h.update(str(response_tokens).encode())
    for name in sorted(inputs):
        value = inputs[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def teacher_response(pm, inputs: dict, response_tokens: int, folder: Path, key: str) -> tuple[Response, bool]:
    """The frozen model's greedy response to a training batch, from ``folder/<key>.safetensors`` when
    that file was written for the same inputs (its metadata holds their digest), otherwise generated
    and written there (temporary file, then rename). Returns the response and whether it was read."""
    path = folder / f"{key}.safetensors"
    digest = _digest(pm, inputs, response_tokens)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("digest") == digest:
                    return Response(f.get_tensor("ids"), f.get_tensor("lengths")), True
        except (SafetensorError, OSError, ValueError, RuntimeError):
            pass  # unreadable: generate it again
    response = greedy_response(pm, inputs, response_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ids": response.ids.contiguous(), "lengths": response.lengths.contiguous()}, str(tmp),
              metadata={"digest": digest, "response_tokens": str(response_tokens)})
    os.replace(tmp, path)
    return response, False


def train_router(cfg: RouterTrainConfig, pm, progress: bool = True, stop_after: int | None = None, batches=None) -> dict | None:
    """Train (or resume) a router for `pm`, the frozen `PrunedModel` (``vlmprune.load(cfg.model)``), and
    save it to ``cfg.out`` (``router.safetensors`` + ``router.json`` with the config and the training log).

    Training state goes to ``OUT/state`` every `save_every` steps; running the same command again
    resumes from it. The teacher's response to each batch is generated once and kept in
    ``OUT/teacher/<key>.safetensors`` (key: ``scenes-<step>`` for FashionScenes scenes, ``batch-<index>``
    for `batches`), which a resumed run reads. `batches`: a list of model-input dicts (prompt batches,
    as `PrunedModel.prepare` takes them) to train on instead of FashionScenes training scenes (cycled),
    e.g. for another model family. `stop_after` stops (saved) after that many steps in total and
    returns None.
    """
    out = Path(cfg.out)
    if (out / CONFIG).is_file():  # written only when a run has finished
        raise VlmpruneError(f"{out} already holds a trained router; choose another --out or delete it")
    if pm is None:
        raise VlmpruneError(f"train_router needs the frozen model: pass pm=vlmprune.load({cfg.model!r})")
    if not 0 <= cfg.token_layer < pm.n_layers:
        raise VlmpruneError(f"token_layer={cfg.token_layer} is out of range: the model has decoder layers 0..{pm.n_layers - 1}")
    lowest = min(layer_count(share, pm.n_layers) for _, share in cfg.budgets())
    if lowest < cfg.token_layer:
        raise VlmpruneError(f"a layer budget keeps {lowest} layers, fewer than token_layer={cfg.token_layer} (layers before it always run); "
                            "raise --layers or lower --token-layer")
    torch.manual_seed(cfg.seed)
    router = Router(RouterConfig.for_model(pm, width=cfg.width, depth=cfg.depth, heads=cfg.heads, ffn=cfg.ffn, token_layer=cfg.token_layer))
    params = list(router.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    run = ResumableRun(out / "state", asdict(cfg), {"router": router}, opt, params)
    run.resume()

    budgets = cfg.budgets()
    tokenizer = pm.processor.tokenizer if pm.processor is not None else None
    n_layers = pm.n_layers
    window: list[dict] = []
    for step in run.steps(cfg.steps, cfg.save_every, stop_after, progress, desc="router"):
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        if batches is not None:
            inputs, key = batches[step % len(batches)], f"batch-{step % len(batches):06d}"
        else:
            inputs, key = _training_samples(cfg, step, tokenizer), f"scenes-{step:06d}"
        response, _ = teacher_response(pm, inputs, cfg.response_tokens, out / "teacher", key)
        with torch.no_grad():
            prep = pm.prepare(**inputs)
            forced = forced_inputs(pm, prep, response)
            teacher = teacher_pass(pm, prep, cfg.score_layer, cfg.token_layer, forced)
        batch = prep.input_ids.shape[0]
        pick = torch.randint(len(budgets), (batch,), generator=gen)
        chosen = [budgets[i] for i in pick.tolist()]
        keep_tokens = torch.tensor([keep_count(t, n) for (t, _), n in zip(chosen, prep.n_visual)])
        keep_layers = torch.tensor([layer_count(l, n_layers) for _, l in chosen])

        token_share = torch.tensor([t for t, _ in chosen])
        layer_share = torch.tensor([l for _, l in chosen])
        router.train()
        out_r = router(replace(prep, inputs_embeds=teacher.hidden), token_share, layer_share)  # layer K's input, as at inference
        token_masks, layer_masks = candidate_masks(teacher, out_r, keep_tokens, keep_layers, cfg.router_samples, gen, cfg.stratified,
                                                   cfg.layer_flows, cfg.token_layer)
        c = token_masks.shape[1]
        flows = plan_from_masks(token_masks.flatten(0, 1), layer_masks.flatten(0, 1), cfg.token_layer)
        kl = flow_kl(pm, forced, flows, teacher.log_probs, repeats=c).view(batch, c)

        if cfg.loss == "preference":
            main = preference_loss(out_r.token_logits, out_r.layer_logits, token_masks, layer_masks, kl, cfg.beta, cfg.margin)
        else:
            main = distill_loss(out_r.token_logits, out_r.layer_logits, token_masks, layer_masks, kl)
        reg = budget_loss(out_r.token_logits, out_r.layer_logits, token_share, layer_share)
        loss = main + cfg.budget_weight * reg
        if cfg.attention_weight:
            loss = loss + cfg.attention_weight * attention_loss(out_r.token_logits, teacher.token_scores)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        top = len(NOISE_SCALES)  # the router's own top-k candidate
        window.append(dict(loss=main.item(), budget=reg.item(), mean_kl=kl.mean().item(),
                           router_kl=kl[:, top].mean().item(), best_kl=kl.min(1).values.mean().item(),
                           response_tokens=response.lengths.float().mean().item()))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            entry = {"step": done, **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
            run.log.append(entry)
            window = []
            run.bar.set_postfix(loss=f"{entry['loss']:.3f}", router_kl=f"{entry['router_kl']:.3f}", mean_kl=f"{entry['mean_kl']:.3f}")
    if run.stopped:
        return None
    router.eval()
    record = dict(train=asdict(cfg), budgets=budgets, seconds=run.elapsed, threads=torch.get_num_threads(),
                  parameters=sum(p.numel() for p in params), log=run.log)
    save_router(router, out, record)
    return record
