"""The decoder loop: prefill with a plan (and in-model policies), then one-token decode steps.

Prefill runs the layers the plan keeps. At a stage layer K it gathers the kept tokens (hidden
states, original positions, mask) before running K; each layer's KV cache therefore holds only
what that layer saw, and skipped layers compute and store nothing. Decode continues from the
original prompt length through the same per-layer caches and skip sets.

Devices: the bookkeeping (positions, masks, per-layer counters, logits) lives on the model's input
device (the embedding's); each decoder layer runs where it lives (`Adapter.placement`: a device_map
split, accelerate's CPU / disk offload), its inputs moved there when that differs, and its cache
stays there. Policies see the token state on the input device. Nothing in the layer loop reads a
value back to the host; the counters reach the CPU once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from ..errors import VlmpruneError
from ..models.base import Adapter, PreparedInputs
from .cache import LayerwiseKVCache
from .plan import KeepRows, Plan
from .sequence import TokenState, decode_mask, prefill_mask
from .skips import SkippedLayers
from .stats import RunStats


class LayerPolicy(Protocol):
    """A method that decides inside the LLM (FastV, PDrop, ...): the engine calls it before `layers`."""

    layers: Sequence[int]

    def select(self, layer: int, view: "StageView") -> "torch.Tensor | Sequence[torch.Tensor] | Plan":
        """Per-sample visual-token indices (original numbering) that survive from `layer` on, or a
        `Plan` with a keep (and optionally merge) stage at `layer` and optionally layers to skip
        (`layer` or later: the layers before it have run)."""
        ...


@dataclass
class StageView:
    """What a policy may read at a stage: the current tokens and cheap attention rows of the last layer run."""

    adapter: Adapter
    state: TokenState
    cache: LayerwiseKVCache
    last_layer: int | None  # the last layer that ran for every sample in the current layout
    last_input: torch.Tensor | None  # that layer's input hidden states [B, L, D]
    n_visual: list[int] = field(default_factory=list)  # each sample's visual tokens in the prompt
    score_rows: torch.Tensor | None = None  # [B, n_layers] counter of query rows scored per layer (RunStats)

    def attention_rows(self, query_index: torch.Tensor) -> torch.Tensor:
        """``[B, H, R, L]`` attention probabilities of queries ``query_index [B, R]`` in the last layer run.

        Each sample's distinct query rows are counted in `score_rows` (repeated rows pad a ragged batch)."""
        if self.last_layer is None:
            raise VlmpruneError("no decoder layer ran before this stage, so there are no attention scores to use")
        rows = query_index.clamp(min=0).to(self.state.valid.device)
        if self.score_rows is not None:
            ordered = rows.sort(1).values
            distinct = (ordered.diff(dim=1) != 0).sum(1) + int(ordered.shape[1] > 0)
            self.score_rows[:, self.last_layer] += distinct.to(self.score_rows.device)
        at = self.last_input.device  # the layer's device (its input and its cache live there)
        hidden = self.last_input.gather(1, rows.to(at)[..., None].expand(-1, -1, self.last_input.shape[-1]))
        positions = self.state.positions.gather(2, rows[None].expand(self.state.positions.shape[0], -1, -1))
        return self.adapter.attention_rows(
            self.last_layer,
            hidden,
            rows,
            positions,
            self.cache.keys[self.last_layer],
            self.cache.key_valid[self.last_layer],
        )

    def last_token_index(self) -> torch.Tensor:
        """``[B, 1]`` the index of each sample's last real token (FastV's query)."""
        return self.state.last_index()[:, None]

    def visual_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Map per-key scores ``[B, L]`` to per-visual-token scores ``[B, n_visual_max]`` (-inf where absent)."""
        n_cols = int(self.state.visual_index.max()) + 1
        out = torch.full((scores.shape[0], n_cols), float("-inf"), dtype=scores.dtype, device=scores.device)
        b_idx, t_idx = (self.state.visual_index >= 0).nonzero(as_tuple=True)
        out[b_idx, self.state.visual_index[b_idx, t_idx]] = scores[b_idx, t_idx]
        return out


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, L_out, V]
    token_index: torch.Tensor  # [B, L_out] original prompt index of each logits row, -1 for padding slots
    last_logits: torch.Tensor  # [B, V] logits at each sample's last real token
    cache: LayerwiseKVCache
    next_position: torch.Tensor  # [B]
    stats: RunStats


@dataclass(frozen=True)
class LayerSamples:
    """The samples of the batch that run one decoder layer.

    ``rows``: None when every sample runs it, else a LongTensor of the samples that do, on the layer's
    device (empty when none does: the layer is not run)."""

    rows: torch.Tensor | None = None

    @property
    def runs(self) -> bool:
        """Whether some sample runs the layer (read from the tensor's shape, not its values)."""
        return self.rows is None or self.rows.numel() > 0


def _layer_samples(skips: tuple[frozenset[int], ...], devices: Sequence[torch.device]) -> list[LayerSamples]:
    """Per layer, the samples that run it, from one set of skipped layers per sample."""
    out = []
    for layer, device in enumerate(devices):
        running = [b for b, skip in enumerate(skips) if layer not in skip]
        rows = None if len(running) == len(skips) else torch.tensor(running, dtype=torch.long, device=device)
        out.append(LayerSamples(rows))
    return out


def _layers_run(skips: tuple[frozenset[int], ...], n_layers: int) -> torch.Tensor:
    """``[B, n_layers]`` bool on the CPU: whether each sample ran each layer (from the final skip sets;
    a policy only ever adds layers that had not run yet)."""
    ran = torch.ones(len(skips), n_layers, dtype=torch.bool)
    for b, skip in enumerate(skips):
        ran[b, sorted(skip)] = False
    return ran


def _run_layer(layer, hidden, rows, mask, rope, cache):
    """Run one decoder layer for the samples in `rows` (None = all); `mask` is already for those rows.
    Every input is already on the layer's device."""
    cos, sin = rope
    if rows is None:
        out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)
        return out.to(hidden.device)
    sub = layer(
        hidden[rows],
        attention_mask=mask,
        position_embeddings=(cos[rows], sin[rows]),
        past_key_values=cache,
        use_cache=True,
    )
    return hidden.index_copy(0, rows, sub.to(hidden.device))


def _head(adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """The final norm and the LM head (each on its device), logits back on the input device."""
    dec, place = adapter.decoder, adapter.placement()
    normed = dec.norm(hidden.to(place.norm))
    return dec.lm_head(normed.to(place.head)).to(place.input)


class _Layout:
    """The rotary tables, mask and validity of one token layout, moved to each device that asks once."""

    def __init__(self, adapter: Adapter, state: TokenState, dtype: torch.dtype):
        self.padded = not bool(state.valid.all())  # one read per layout (never per layer)
        rope = adapter.rotary(state.hidden, state.positions)
        mask = prefill_mask(state.valid, adapter.attn_implementation, dtype, self.padded)
        self.home = state.valid.device
        self._on: dict[torch.device, tuple] = {self.home: (rope, mask, state.valid)}
        self._source = (rope, mask, state.valid)

    def on(self, device: torch.device) -> tuple:
        """(rope, mask, valid) on `device`."""
        if device not in self._on:
            (cos, sin), mask, valid = self._source
            self._on[device] = ((cos.to(device), sin.to(device)), None if mask is None else mask.to(device), valid.to(device))
        return self._on[device]


def prefill(
    adapter: Adapter,
    prep: PreparedInputs,
    plan: Plan,
    policies: Sequence[LayerPolicy] = (),
    logits_to_keep: int = 0,
    observers: Sequence = (),
) -> PrefillResult:
    """Run the decoder over a prepared batch under a plan.

    ``logits_to_keep=0`` returns logits for every token that reaches the head (in original order,
    ``token_index`` maps rows to prompt indices); ``1`` returns only each sample's last real token.
    Each observer is called as ``observer(layer, hidden_in, hidden_out, valid)`` after a layer runs
    (rows of the samples that ran it), for calibration statistics.
    """
    dec = adapter.decoder
    n_layers = dec.n_layers
    batch = prep.input_ids.shape[0]
    n_visual = prep.n_visual  # (read from the device once)
    plan.validate(n_layers, n_visual)
    by_layer: dict[int, LayerPolicy] = {}
    for policy in policies:
        for layer in policy.layers:
            if layer in plan.keep or layer in by_layer:
                raise VlmpruneError(f"two token decisions at layer {layer}; give each stage to one method")
            if not 0 <= layer < n_layers:
                raise VlmpruneError(f"a policy decides at layer {layer}, outside 0..{n_layers - 1}")
            by_layer[layer] = policy

    place = adapter.placement()
    home = place.input
    state = TokenState.from_prepared(prep)
    cache = LayerwiseKVCache(n_layers, batch)
    skips = plan.skip  # grows when a policy skips later layers
    layer_samples = _layer_samples(skips.for_batch(batch), place.layers)
    stages: dict[int, KeepRows] = dict(plan.keep)
    merges: dict[int, KeepRows] = dict(plan.merge)
    tokens = torch.zeros(batch, n_layers, dtype=torch.long, device=home)  # counters stay on the device
    visual = torch.zeros_like(tokens)
    score_rows = torch.zeros_like(tokens)
    layout: _Layout | None = None
    last_layer, last_input = None, None
    dtype = state.hidden.dtype

    for i, layer in enumerate(dec.layers):
        if i in by_layer:
            state.hidden = state.hidden.to(home)  # a policy reads the state on the input device
            view = StageView(adapter, state, cache, last_layer, last_input, n_visual, score_rows)
            decision = by_layer[i].select(i, view)
            decided = decision if isinstance(decision, Plan) else Plan(keep={i: decision})
            decided.validate(n_layers, n_visual)
            if i in decided.keep:  # (a decision may only skip later layers)
                stages[i] = _restrict(decided.keep[i], state, i)
            if i in decided.merge:
                merges[i] = decided.merge[i]
            if any(decided.skip_sets(batch)):
                skips = _later_skips(skips.for_batch(batch), decided.skip_sets(batch), i)
                layer_samples = _layer_samples(skips.for_batch(batch), place.layers)
        if i in stages:
            state.hidden = state.hidden.to(home)
            state = state.keep_visual(stages[i], merges.get(i))
            layout = None
            last_layer, last_input = None, None
        tokens[:, i] = state.token_counts()
        visual[:, i] = state.visual_counts()
        if not layer_samples[i].runs:
            continue
        rows = layer_samples[i].rows  # None: every sample
        if layout is None:  # once per layout: rotary tables and mask for the current tokens
            state.hidden = state.hidden.to(home)
            layout = _Layout(adapter, state, dtype)
        device = place.layers[i]
        rope, mask, valid = layout.on(device)
        cache.key_valid[i] = valid if rows is None else valid[rows]
        cache.rows[i] = rows
        cache.padded[i] = layout.padded
        hidden_in = state.hidden.to(device)
        row_mask = mask if mask is None or rows is None else mask[rows]
        state.hidden = _run_layer(layer, hidden_in, rows, row_mask, rope, cache)
        if observers:
            seen = (hidden_in, state.hidden, valid) if rows is None else (hidden_in[rows], state.hidden[rows], valid[rows])
            for observe in observers:
                observe(i, *seen)
        if rows is None:
            last_layer, last_input = i, hidden_in

    last = state.last_index()
    b = torch.arange(batch, device=last.device)
    if logits_to_keep == 1:
        at = state.hidden.device
        hidden, token_index = state.hidden[b.to(at), last.to(at)][:, None], state.source_index[b, last][:, None]
    elif logits_to_keep == 0:
        hidden, token_index = state.hidden, state.source_index
    else:
        raise VlmpruneError("logits_to_keep must be 0 (every token) or 1 (each sample's last token)")
    logits = _head(adapter, hidden)
    last_logits = logits[:, -1] if logits_to_keep == 1 else logits[b, last]
    applied = Plan(keep=stages, skip=skips, merge=merges, overhead=plan.overhead)
    head_rows = torch.ones(batch, dtype=torch.long) if logits_to_keep == 1 else state.token_counts().cpu()
    input_visual = (prep.visual_mask & prep.attention_mask).sum(1).cpu()
    ran = _layers_run(applied.skip_sets(batch), n_layers)
    stats = RunStats(
        tokens=tokens.cpu(),
        visual_tokens=visual.cpu(),
        layers_run=ran,
        kv_entries=cache.entries(),
        plan=applied,
        kv_bytes=cache.nbytes(),
        input_visual=input_visual,
        head_rows=head_rows,
        score_rows=score_rows.cpu(),
    )
    return PrefillResult(logits, token_index, last_logits, cache, prep.next_position, stats)


def _later_skips(
    skips: tuple[frozenset[int], ...], decided: tuple[frozenset[int], ...], layer: int
) -> SkippedLayers:
    """The per-sample skip sets so far joined with a policy's, which may name only `layer` or later."""
    for b, row in enumerate(decided):
        if row and min(row) < layer:
            raise VlmpruneError(f"the decision at layer {layer} skips layer {min(row)} of sample {b}, which has already run")
    return SkippedLayers(tuple(a | b for a, b in zip(skips, decided)), per_sample=True)


def _restrict(chosen: KeepRows, state: TokenState, layer: int) -> KeepRows:
    bad = state.first_absent(chosen)
    if bad is not None:
        raise VlmpruneError(f"the decision at layer {layer} keeps visual tokens of sample {bad} that were dropped earlier")
    return chosen


def decode_step(adapter: Adapter, cache: LayerwiseKVCache, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One new token per sample (``token_ids [B]`` at rotary ``positions [B]``) through the cached layers.

    Returns ``[B, V]`` logits. Layers that did not run at prefill do not run here either.
    """
    dec = adapter.decoder
    place = adapter.placement()
    hidden = dec.embed_tokens(token_ids[:, None].to(place.input)).to(place.input)  # (B, 1, D)
    pos = positions.to(place.input).view(1, -1, 1).expand(adapter.position_axes, -1, -1)
    rope = adapter.rotary(hidden, pos)
    ropes = {place.input: rope}
    for i, layer in enumerate(dec.layers):
        if not cache.runs(i):
            continue
        device = place.layers[i]
        if device not in ropes:
            ropes[device] = (rope[0].to(device), rope[1].to(device))
        rows = cache.rows[i]
        valid = cache.append_valid(i)  # in place after `reserve`
        mask = decode_mask(valid, adapter.attn_implementation, hidden.dtype, cache.padded[i])  # None unless padded
        hidden = _run_layer(layer, hidden.to(device), rows, mask, ropes[device], cache)
    return _head(adapter, hidden)[:, -1]
