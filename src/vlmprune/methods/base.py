"""What methods share: budgets, the method protocol, and composing a token method with a layer method.

A method is a frozen, validated dataclass with ``decide(pm, prep) -> (Plan, [LayerPolicy])``: a plan
for what it decides before the LLM, and policies the engine calls for what it decides inside it.
Methods that decide inside the LLM also give ``schedule(sample, n_layers) -> Schedule``: how many
tokens they keep where, as counts, so a FLOPs budget (`methods.budget.AtFlops`) can price them
without running the model.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..engine.plan import Plan
from ..engine.runner import StageView
from ..errors import VlmpruneError
from ..validate import check_share  # re-exported: a method's share field in [0, 1]


@dataclass(frozen=True)
class SampleShape:
    """One prompt as counts: what a method's `schedule` may depend on."""

    n_text: int  # real text tokens
    n_visual: int  # visual tokens
    text_after: int  # text tokens after the first visual token (the queries that can see the image)


@dataclass(frozen=True)
class Schedule:
    """What a method will do to one sample, as counts (enough to price it, see `eval.flops`).

    ``keep``: stage layer K -> visual tokens present from K on. ``score_rows``: layer -> attention-score
    query rows read from that layer. ``skip``: layers not run."""

    keep: Mapping[int, int] = field(default_factory=dict)
    score_rows: Mapping[int, int] = field(default_factory=dict)
    skip: frozenset[int] = frozenset()


def opt(default: Any, help: str, parse: Callable[[str], Any] | None = None, **kwargs: Any) -> Any:
    """A method option: a dataclass field with its help text (and, if its command-line text needs
    more than the field's type, its parser) as metadata, declared once. ``vlmprune methods`` prints
    the help; ``--opt NAME=VALUE`` parses VALUE (`methods.options`). Other keywords go to `field`."""
    return field(default=default, metadata={"help": help, **({"parse": parse} if parse else {})}, **kwargs)


def _check_budget(value, what: str, unit: str, share: str, of: str = "") -> None:
    """A budget: a `share` in (0, 1] (float) or a `unit` count >= 1 (int); a bool is neither."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VlmpruneError(f"{what} must be a {share}{of} in (0, 1] or a {unit} count >= 1, got {value!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise VlmpruneError(f"{what}={value} is outside (0, 1]; give a {share} in (0, 1] or an integer {unit} count")
    if isinstance(value, int) and value < 1:
        raise VlmpruneError(f"{what}={value}: a {unit} count must be >= 1")


def check_keep(keep: float | int, what: str = "keep") -> None:
    """A token budget: a ratio in (0, 1] (float) or a count >= 1 (int)."""
    _check_budget(keep, what, "token", "ratio")


def keep_count(keep: float | int, n_visual: int) -> int:
    """Visual tokens to keep out of `n_visual` for budget `keep` (a ratio rounds, at least 1)."""
    if isinstance(keep, float):
        return max(1, min(n_visual, round(keep * n_visual)))
    if keep > n_visual:
        raise VlmpruneError(f"keep={keep} visual tokens, but a sample has only {n_visual}; use a count <= {n_visual} or a ratio")
    return keep


def check_stages(method: str, keep: float, stages: tuple[float, ...]) -> None:
    """Multi-stage methods: `keep` is the final share of visual tokens, `stages` increasing depth fractions."""
    check_keep(keep)
    if not isinstance(keep, float):
        raise VlmpruneError(f"{method}'s keep is the final share of visual tokens: a ratio in (0, 1]")
    if not stages or any(not 0 < f < 1 for f in stages) or list(stages) != sorted(set(stages)):
        raise VlmpruneError(f"{method} stages must be increasing fractions of depth in (0, 1), got {stages}")


def stage_layers(stages: tuple[float, ...], n_layers: int) -> tuple[int, ...]:
    """Stage boundaries as decoder layers: ``round(f * n_layers)`` clamped to ``1 .. n_layers-1`` (a
    stage reads the attention of the layer before it), duplicates merged."""
    return tuple(sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in stages}))


def sample_fingerprint(input_ids: torch.Tensor, visual_embeds: torch.Tensor) -> int:
    """A 32-bit fingerprint of one sample alone: the crc32 of its real token ids (int64, little-endian)
    followed by the mean absolute value of its visual-token input embeddings (float64, 4 significant
    digits). Padding, batch position and the other samples do not enter it. The embedding term only
    tells apart images under the same prompt; rounding makes it robust to kernel-level float noise (a
    batch could only change it if that noise moved the mean across a 4th-digit rounding boundary)."""
    ids = input_ids.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes()
    scale = float(visual_embeds.detach().double().abs().mean()) if visual_embeds.numel() else 0.0
    return zlib.crc32(f"{scale:.3e}".encode(), zlib.crc32(ids))


def sample_generator(seed: int, prep, b: int) -> torch.Generator:
    """A CPU generator for sample `b` of the prepared batch `prep` alone, for methods that draw at random.

    Seeded with the crc32 of `seed` (8 bytes, little-endian) continued from ``sample_fingerprint`` of
    that sample (its real token ids and visual embeddings), so draws are reproducible from the seed and
    the sample, independent across samples and batches, and the same alone or in any padded batch at
    any position; a different `seed` gives a different generator seed (distinct for seeds that differ
    by less than 2**32; 32 bits because torch's CPU generator keeps only the low 32 bits of a seed)."""
    real = prep.attention_mask[b].bool()
    visual = prep.visual_mask[b] & real
    mine = sample_fingerprint(prep.input_ids[b][real], prep.inputs_embeds[b][visual])
    return torch.Generator().manual_seed(zlib.crc32(int(seed).to_bytes(8, "little", signed=True), mine))


def check_layer(layer: int, n_layers: int, lowest: int = 0, what: str = "layer") -> None:
    if not lowest <= layer < n_layers:
        raise VlmpruneError(f"{what}={layer} is out of range: this model's decoder layers are {lowest}..{n_layers - 1}")


def check_keep_layers(keep_layers: float | int) -> None:
    """A layer budget, as a token budget: a share of the decoder layers in (0, 1] (float) or a count >= 1 (int)."""
    _check_budget(keep_layers, "keep_layers", "layer", "share", " of the decoder layers")


def layer_count(share: float, n_layers: int) -> int:
    """Layers kept for a share of `n_layers`: ``floor(share * n + 0.5)`` (halves round up), 1 .. n."""
    return max(1, min(n_layers, math.floor(share * n_layers + 0.5)))


def layers_kept(keep_layers: float | int, n_layers: int) -> int:
    """The layer count of budget `keep_layers` (a share rounds by `layer_count`; a count must fit)."""
    if isinstance(keep_layers, float):
        return layer_count(keep_layers, n_layers)
    if keep_layers > n_layers:
        raise VlmpruneError(f"keep_layers={keep_layers} but the model has {n_layers} decoder layers; use a count <= {n_layers} or a share")
    return keep_layers


def skip_all_but(ranking: torch.Tensor, keep_layers: float | int, n_layers: int) -> list[int]:
    """The layers to skip: all but the `keep_layers` budget (share or count) of `ranking`'s last
    entries (least wanted first), sorted."""
    return sorted(ranking[: n_layers - layers_kept(keep_layers, n_layers)].tolist())


def parse_budget(text: str, field: str = "keep") -> float | int:
    """A budget (`field`: ``keep`` or ``keep_layers``) from the command line or lmms-eval's model_args,
    with one meaning everywhere: a plain integer (``"64"``, ``"1"``) is a count, a number with a point
    or an exponent (``"0.25"``, ``"1.0"``, ``"1e-1"``) a share; checked like the field itself."""
    text = str(text).strip()
    try:
        value: float | int = int(text) if text.lstrip("+").isdigit() else float(text)
    except ValueError:
        raise VlmpruneError(f"{field} takes a share in (0, 1] (e.g. 0.25, or 1.0 for all) or a count (e.g. 64), got {text!r}") from None
    if field == "keep_layers":
        check_keep_layers(value)
    else:
        check_keep(value, field)
    return value


def top_visual(view: StageView, scores: torch.Tensor, keep: float | int) -> list[torch.Tensor]:
    """Per sample, the `keep` budget of the currently present visual tokens with the highest scores.

    `scores` is ``[B, n_cols]`` over visual indices, -inf where a token is absent (`StageView.visual_scores`).
    """
    present = view.state.visual_counts().tolist()
    return top_rows(scores, [keep_count(keep, n) for n in present])


def top_rows(scores: torch.Tensor, counts: list[int], widths: list[int] | None = None) -> list[torch.Tensor]:
    """Each row b's top-``counts[b]`` indices among its first ``widths[b]`` scores (every score when
    None), as one top-k per group of rows with the same width and count."""
    widths = [scores.shape[1]] * len(counts) if widths is None else widths
    groups: dict[tuple[int, int], list[int]] = {}
    for b, key in enumerate(zip(widths, counts)):
        groups.setdefault(key, []).append(b)
    out: list[torch.Tensor] = [torch.empty(0)] * len(counts)
    for (width, k), members in groups.items():
        index = torch.tensor(members, device=scores.device)
        for b, row in zip(members, scores[index, :width].topk(k, dim=1).indices):
            out[b] = row
    return out


def last_token_attention(view: StageView) -> torch.Tensor:
    """``[B, n_cols]`` the last token's attention to each visual token in the previous layer, mean over heads."""
    rows = view.attention_rows(view.last_token_index())  # (B, H, 1, L)
    return view.visual_scores(rows.mean(1)[:, 0])


@dataclass(frozen=True)
class Compose:
    """Several methods (or plain Plans) in one run, e.g. ``Compose(FastV(...), ShortGPT(...))``: their
    token stages must sit at different layers; skipped layers are the union."""

    methods: tuple

    def __init__(self, *methods: Any):
        if not methods:
            raise VlmpruneError("Compose needs at least one method")
        object.__setattr__(self, "methods", tuple(methods))

    def decide(self, pm, prep) -> tuple[Plan, list]:
        keep, merge, skip, policies, overhead = {}, {}, set(), [], None
        for method in self.methods:
            plan, pols = (method, []) if isinstance(method, Plan) else method.decide(pm, prep)
            overlap = set(plan.keep) & set(keep)
            if overlap:
                raise VlmpruneError(f"two methods drop tokens at layer {sorted(overlap)[0]}; compose methods that act at different layers")
            if plan.skip.per_sample:
                raise VlmpruneError("Compose takes methods whose skip lists are shared by the batch")
            keep.update(plan.keep)
            merge.update(plan.merge)
            skip |= plan.skip.layers
            policies.extend(pols)
            mine = torch.tensor(plan.overheads(prep.input_ids.shape[0]), dtype=torch.float64)
            overhead = mine if overhead is None else overhead + mine
        return Plan(keep=keep, skip=sorted(skip), merge=merge, overhead=overhead), policies
