"""PAR as a pruning method: a trained router decides, per sample, the visual tokens and layers kept.

Three registered versions share one router: ``par`` (hybrid: `keep` visual tokens and `layers` of the
decoder layers), ``par-tokens`` (tokens only) and ``par-layers`` (layers only, `keep_layers` layers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...counts import LMCounts
from ...engine.plan import Plan
from ...engine.runner import StageView
from ...errors import VlmpruneError
from ...models.base import PreparedInputs
from ...validate import check_share
from ..base import check_keep, check_keep_layers, keep_count, layer_count, layers_kept, opt, top_rows
from ..registry import register_method
from .checkpoint import load_router, router_path
from .router import Router, RouterOutput


def check_layer_share(layers) -> None:
    """PAR's `layers`: the share of decoder layers kept, in (0, 1]."""
    check_share("layers", layers, "give the share kept, e.g. 0.5", allow_zero=False)


def plan_from_scores(out: RouterOutput, keep: float | int | None, layers: int | None, token_layer: int, overhead=0.0) -> Plan:
    """The router's `keep` visual tokens (None: all; tile-balanced top-k unless the router is plain)
    from `token_layer` on and its top-`layers` decoder layers (None: all) of each sample; the layers
    before `token_layer` always run (the router reads their output)."""
    stages, skip = {}, ()
    if keep is not None:
        counts = torch.tensor([keep_count(keep, n) for n in out.n_visual])
        scores = out.selection_scores(counts)
        stages = {token_layer: top_rows(scores, counts.tolist(), out.n_visual)}
    if layers is not None:
        n_layers = out.layer_logits.shape[1]
        check_router_layers(layers, n_layers, token_layer)
        later = out.layer_logits[:, token_layer:]
        lowest = later.topk(n_layers - layers, dim=1, largest=False).indices + token_layer
        skip = tuple(frozenset(row) for row in lowest.tolist())
    return Plan(keep=stages, skip=skip, overhead=overhead)


def check_router_layers(layers: int, n_layers: int, token_layer: int) -> None:
    if not token_layer <= layers <= n_layers:
        raise VlmpruneError(
            f"{layers} decoder layers kept, but this router reads the hidden states at layer {token_layer}, so layers "
            f"0..{token_layer - 1} always run: keep {max(1, token_layer)}..{n_layers} layers (or use a router with a lower --token-layer)"
        )


@dataclass
class RouterStage:
    """The in-model half of PAR at a token layer K >= 1: before layer K runs, the router reads every
    token's hidden state (layer K's input) and decides the visual tokens kept from K on and the layers
    skipped from K on."""

    router: Router
    prep: PreparedInputs
    keep: float | int | None
    keep_layers: int | None
    shares: tuple[float, float]

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.router.config.token_layer,)

    def select(self, layer: int, view: StageView) -> Plan:
        if view.state.visual_counts().tolist() != self.prep.n_visual or view.state.hidden.shape[:2] != self.prep.input_ids.shape:
            raise VlmpruneError(f"PAR's router reads every token at layer {layer}; compose it only with methods that act at or after that layer")
        with torch.no_grad():
            out = self.router(replace(self.prep, inputs_embeds=view.state.hidden), *self.shares)
        return plan_from_scores(out, self.keep, self.keep_layers, layer)


class _RouterMethod:
    """What the three versions share: the router (loaded once per path; ``"testbed"``, the default, is the
    router shipped for the testbed model) and the decision."""

    router: str | None

    def _router(self, pm) -> Router:
        if self.router is None:
            raise VlmpruneError(f"{self.method_name} needs a trained router: {type(self).__name__}(router=DIR) or --router DIR")
        router = load_router(self.router)
        router.config.check_model(pm)
        return router

    def _budget(self, pm) -> tuple[float | int | None, int | None]:
        """(visual tokens kept, layers kept) with None for all."""
        raise NotImplementedError

    def min_layers(self, pm) -> int:
        """The fewest layers a plan can keep: the layers before the router's token layer always run."""
        return max(1, self._router(pm).config.token_layer)

    def decide(self, pm, prep):
        """At token layer K = 0 the router reads the input embeddings and the whole plan is decided
        before the LLM; at K >= 1 it reads layer K's input hidden states, so it decides in the model
        (`RouterStage`), with no extra pass: layers 0..K-1 run over every token anyway."""
        keep, layers = self._budget(pm)
        router = self._router(pm)
        router.to(prep.inputs_embeds.device)
        token_layer = router.config.token_layer
        if layers is not None:
            check_router_layers(layers, pm.n_layers, token_layer)
        token_share = 1.0 if keep is None else (keep if isinstance(keep, float) else keep / max(1, max(prep.n_visual)))
        layer_share = 1.0 if layers is None else layers / pm.n_layers
        overhead = router.macs(prep).cpu()
        if token_layer > 0:
            return Plan(overhead=overhead), [RouterStage(router, prep, keep, layers, (token_share, layer_share))]
        with torch.no_grad():
            out = router(prep, token_share, layer_share)
        return plan_from_scores(out, keep, layers, token_layer, overhead), []

    def lm_counts(self, pm, prep) -> LMCounts:
        """The language model's work as counts, for FLOPs budgets (`AtFlops`), with no routing pass:
        every layer from the token layer K on sees the same tokens and only those can be skipped, so
        which tokens and layers the router picks does not change the cost."""
        keep, layers = self._budget(pm)
        router = self._router(pm)
        token_layer = router.config.token_layer
        if layers is not None:
            check_router_layers(layers, pm.n_layers, token_layer)
        real = prep.attention_mask.bool()
        n_visual = (prep.visual_mask & real).sum(1).tolist()
        n_text = [r - v for r, v in zip(real.sum(1).tolist(), n_visual)]
        kept = [{} if keep is None else {token_layer: keep_count(keep, n)} for n in n_visual]
        skip = [range(token_layer, token_layer + (0 if layers is None else pm.n_layers - layers))] * len(n_visual)
        counts = LMCounts.from_schedule(n_text, n_visual, pm.n_layers, kept, skip)
        counts.overhead = router.macs(prep).cpu().double()
        return counts


@register_method("par", kind="hybrid", budget="keep")
@dataclass(frozen=True)
class PAR(_RouterMethod):
    """Hybrid PAR: per sample, the router's top `keep` visual tokens (ratio or count) survive from its
    token layer K on, and its top `layers` share of the decoder layers run.

        par = vlmprune.PAR.load("runs/par", tokens=0.25, layers=0.75)
        pm(**inputs, prune=par)
    """

    router: str | None = opt("testbed", "a trained PAR router directory, or 'testbed' (the router shipped for the testbed model)")
    keep: float | int = opt(0.25, "visual tokens the router keeps: a share in (0, 1] of each sample's, or a count")
    layers: float = opt(0.75, "share of the decoder layers kept, in (0, 1]")

    def __post_init__(self) -> None:
        check_keep(self.keep)
        check_layer_share(self.layers)

    @classmethod
    def load(cls, path: str | Path = "testbed", tokens: float | int = 0.25, layers: float = 0.75) -> "_RouterMethod":
        """The version a budget asks for: hybrid, `PARTokens` with ``layers=1``, `PARLayers` with ``tokens=1``.
        `path`: a router directory, or ``"testbed"`` for the router shipped with the testbed model."""
        path = router_path(path)
        load_router(path)  # fail early on a missing or corrupt checkpoint
        if layers == 1 and tokens != 1:
            return PARTokens(router=str(path), keep=tokens)
        check_layer_share(layers)
        if tokens == 1:
            return PARLayers(router=str(path), keep_layers=None, layers=layers)
        return cls(router=str(path), keep=tokens, layers=layers)

    def _budget(self, pm):
        return self.keep, layer_count(self.layers, pm.n_layers)


@register_method("par-tokens", kind="inside", budget="keep")
@dataclass(frozen=True)
class PARTokens(_RouterMethod):
    """Token-only PAR: the router's top `keep` visual tokens (ratio or count); every layer runs."""

    router: str | None = opt("testbed", "a trained PAR router directory, or 'testbed' (the router shipped for the testbed model)")
    keep: float | int = opt(0.25, "visual tokens the router keeps: a share in (0, 1] of each sample's, or a count")

    def __post_init__(self) -> None:
        check_keep(self.keep)

    def _budget(self, pm):
        return self.keep, None


@register_method("par-layers", kind="layers", budget="keep_layers")
@dataclass(frozen=True)
class PARLayers(_RouterMethod):
    """Layer-only PAR: per sample, the router's top `keep_layers` decoder layers run (or a `layers`
    share when `keep_layers` is None); every visual token stays."""

    router: str | None = opt("testbed", "a trained PAR router directory, or 'testbed' (the router shipped for the testbed model)")
    keep_layers: float | int | None = opt(None, "a share in (0, 1] or a count; None: the `layers` share")
    layers: float = opt(0.75, "share of the decoder layers the router keeps, in (0, 1], when keep_layers is None")

    def __post_init__(self) -> None:
        if self.keep_layers is not None:
            check_keep_layers(self.keep_layers)
        check_layer_share(self.layers)

    def _budget(self, pm):
        n = layers_kept(self.keep_layers, pm.n_layers) if self.keep_layers is not None else layer_count(self.layers, pm.n_layers)
        if n > pm.n_layers:
            raise VlmpruneError(f"keep_layers={n} but the model has {pm.n_layers} decoder layers")
        return None, n
