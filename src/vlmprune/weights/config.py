"""`WeightPruneConfig`: what `prune_weights` does, one object, every field declared once.

Each field carries its help text (``metadata["help"]``) and, where it is not a string, the parser of
its command-line text (``metadata["parse"]``): ``vlmprune prune-weights`` makes one flag per field
(``--zeroth-mode`` for ``zeroth_mode``) and builds the config by field name (`config_from`). The
allocation (`method`) and the local pruner (`local`) are names in the registries (`registry.py`),
built-in or registered by the user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..errors import VlmpruneError
from .allocation import SCORES, ZEROTH_MODES
from .allocators import ZEROTH_SCORE_SAMPLES  # importing allocators registers uniform, owl, ecoflap
from .local import Pattern  # importing local registers magnitude, wanda, sparsegpt
from .registry import ALLOCATIONS, PRUNERS

ORDERS = ("zeroth", "first")
GRANULARITIES = ("layer", "block")
ALLOCATION_RULES = ("released", "clamped")  # ECoFLaP's released rule / vlmprune's clamped proportional fill
OWL_LAMBDA = 0.08  # OWL's README recipe: --Lamda 0.08 --Hyper_m 5
OWL_M = 5.0  # OWL's outlier threshold M, in multiples of a unit's mean Wanda score
DEFAULT_SPARSITY = 0.5
ZEROTH_BATCH = 16  # directions per stacked forward: 32 rows (the default's 4 samples x 4 pieces in one forward)
ZEROTH_SCORE_TOKENS = 64  # ... and each text sample cut into pieces of this many tokens, one direction each


def comma_list(text: str) -> tuple[str, ...] | None:
    """``"a, b" -> ("a", "b")``; an empty text gives None (the default)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    return parts or None


def _option(default, help: str, parse=None):
    return field(default=default, metadata={"help": help, **({"parse": parse} if parse else {})})


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VlmpruneError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _number(name: str, value, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise VlmpruneError(f"{name}={value!r} must be a finite number >= 0 ({hint})")


@dataclass(frozen=True)
class WeightPruneConfig:
    """What `prune_weights` does; every field is checked when built (the CLI builds one before loading).
    See each field's ``metadata["help"]`` (``vlmprune prune-weights --help`` prints them)."""

    method: str = _option("uniform", "sparsity allocation: uniform, owl, ecoflap or a registered one")
    local: str = _option("wanda", "local pruner: wanda, sparsegpt, magnitude or a registered one")
    sparsity: float | None = _option(
        None, f"overall share of the pruned linears' weights to zero, in [0, 1) (default {DEFAULT_SPARSITY}, or 1 - N/M with nm)", float)
    nm: str | tuple[int, int] | None = _option(None, "N:M pattern, e.g. 2:4 (keep N of every M input columns; with method uniform)")
    order: str = _option("zeroth", "ECoFLaP importance: zeroth (forward passes only) or first (backprop)")
    granularity: str = _option("block", "block (one sparsity per decoder layer / vision block) or layer (per linear)")
    cap: float = _option(0.1, "ECoFLaP: no unit sparser than the target + cap (its max_sparsity_per_layer); with "
                         "allocation clamped, also none denser than the target - cap. OWL does not use it", float)
    patterns: tuple[str, ...] | None = _option(
        None, "module-name patterns of the linears to prune (fnmatch, or 're:' + a regex; comma-separated on the command "
        "line); default: all linears inside the blocks", comma_list)
    seed: int = _option(0, "seeds ECoFLaP's zeroth-order directions (and, on the command line, the calibration sample)", int)
    score_samples: int | None = _option(
        None, f"calibration samples (the first ones) ECoFLaP's importance scores use (default: {ZEROTH_SCORE_SAMPLES} for "
        "zeroth order, all for first); zeroth order scores each sample alone, with its own direction, where the batch splits "
        "into samples", int)
    score_tokens: int = _option(ZEROTH_SCORE_TOKENS, "ECoFLaP zeroth order: cut each text sample into pieces of this many "
                                "tokens, one random direction each (0: whole samples; samples with images stay whole)", int)
    allocation: str = _option("released", "ECoFLaP's scores to sparsities: released (ECoFLaP's code: every unit keeps "
                              "1 - (target + cap) first, the rest shared by score) or clamped (keep fractions proportional "
                              "to the scores, within target +- cap)")
    zeroth_mode: str = _option("per-matrix", "ECoFLaP zeroth order: per-matrix (each weight matrix perturbed alone, as "
                               "ECoFLaP's code) or block (the whole unit at once, fewer forwards)")
    zeroth_batch: int = _option(ZEROTH_BATCH, "ECoFLaP zeroth order: directions evaluated in one forward, their +eps and -eps rows "
                                "stacked (1: two forwards per direction, the plain path; scores equal up to float rounding)", int)
    score: str | None = _option(None, "ECoFLaP importance per matrix: grad (|gradient|) or grad-weight (|w| x |gradient|); "
                                "default: grad for zeroth order, grad-weight for first, as ECoFLaP's scripts")
    owl_lambda: float = _option(OWL_LAMBDA, "OWL's lambda: the allocated sparsities span 2 x lambda (max - min)", float)
    owl_m: float = _option(OWL_M, "OWL's M: a Wanda score above M x its unit's mean is an outlier", float)

    def __post_init__(self) -> None:
        ALLOCATIONS[self.method]
        PRUNERS[self.local]
        _choice("order", self.order, ORDERS)
        _choice("granularity", self.granularity, GRANULARITIES)
        if self.sparsity is not None:
            Pattern(sparsity=self.sparsity)  # a number in [0, 1)
        if self.nm is not None:
            ratio = Pattern(nm=self.nm).ratio
            if self.method != "uniform":
                raise VlmpruneError(
                    f"an N:M pattern fixes every linear at sparsity {ratio:g}, so method={self.method!r} has nothing to "
                    "allocate; use method='uniform' (--method uniform) with nm, or unstructured sparsity"
                )
            if self.sparsity is not None and not math.isclose(self.sparsity, ratio):
                raise VlmpruneError(f"sparsity={self.sparsity!r} disagrees with nm={self.nm!r} (sparsity {ratio:g}); give one of them")
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)) or not math.isfinite(self.cap) or self.cap < 0:
            raise VlmpruneError(f"cap={self.cap!r} must be a finite number >= 0 (e.g. 0.1)")
        if self.patterns is not None:
            object.__setattr__(self, "patterns", (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise VlmpruneError(f"seed={self.seed!r} must be an int")
        if self.score_samples is not None and (
            isinstance(self.score_samples, bool) or not isinstance(self.score_samples, int) or self.score_samples < 1
        ):
            raise VlmpruneError(f"score_samples={self.score_samples!r} must be a positive int (or None for the default)")
        if isinstance(self.score_tokens, bool) or not isinstance(self.score_tokens, int) or self.score_tokens < 0:
            raise VlmpruneError(f"score_tokens={self.score_tokens!r} must be an int >= 0 (tokens per scored piece; 0: whole samples)")
        if isinstance(self.zeroth_batch, bool) or not isinstance(self.zeroth_batch, int) or self.zeroth_batch < 1:
            raise VlmpruneError(f"zeroth_batch={self.zeroth_batch!r} must be a positive int (directions per forward; 1: one at a time)")
        _choice("allocation", self.allocation, ALLOCATION_RULES)
        _choice("zeroth_mode", self.zeroth_mode, ZEROTH_MODES)
        if self.score is not None:
            _choice("score", self.score, SCORES)
        _number("owl_lambda", self.owl_lambda, "half the spread of OWL's sparsities, e.g. 0.08")
        _number("owl_m", self.owl_m, "OWL's outlier threshold, e.g. 5")

    @property
    def target(self) -> float:
        if self.nm is not None:
            return Pattern(nm=self.nm).ratio
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    @property
    def score_kind(self) -> str:
        """The ECoFLaP score in use: `score`, or the released scripts' choice for `order`."""
        return self.score or ("grad" if self.order == "zeroth" else "grad-weight")

    @property
    def pattern_nm(self) -> tuple[int, int] | None:
        return None if self.nm is None else Pattern(nm=self.nm).nm


def config_from(values: Mapping) -> WeightPruneConfig:
    """The config from a mapping holding fields by name (e.g. ``vars(args)`` of the parsed command
    line): a missing or None value takes the field's default; keys that are not fields are ignored."""
    return WeightPruneConfig(**{f.name: values[f.name] for f in fields(WeightPruneConfig) if values.get(f.name) is not None})


def config_of(cfg: WeightPruneConfig | None, options: Mapping) -> WeightPruneConfig:
    """`cfg` itself, or one built from keyword `options` by name (`prune_weights`'s keyword form)."""
    if cfg is not None:
        if not isinstance(cfg, WeightPruneConfig):
            raise VlmpruneError(f"cfg must be a WeightPruneConfig, got {type(cfg).__name__}; or pass its fields as keywords")
        if options:
            raise VlmpruneError(f"give either cfg or its fields as keywords ({', '.join(options)}), not both; "
                                "e.g. dataclasses.replace(cfg, ...)")
        return cfg
    names = [f.name for f in fields(WeightPruneConfig)]
    unknown = [k for k in options if k not in names]
    if unknown:
        raise VlmpruneError(f"unknown weight-pruning option(s) {unknown}; the fields of WeightPruneConfig are: {', '.join(names)}")
    return WeightPruneConfig(**options)
