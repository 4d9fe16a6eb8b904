"""Prune a model's weights in place: allocation x local pruner x calibration data, block by block.

Which linears: every ``nn.Linear`` inside the vision tower's blocks and the language model's decoder
layers (or those whose names match `patterns`); embeddings, projector, merger and ``lm_head`` are never
touched. How sparse each one gets (`method`, see `allocation.py`):

* ``"uniform"``: every linear at `sparsity`;
* ``"owl"``: OWL (Yin et al. 2023, https://arxiv.org/abs/2310.05175): units with more Wanda outliers
  in the dense model get lower sparsity, spread ``2 * cap`` (`cap` plays OWL's lambda);
* ``"ecoflap"``: ECoFLaP (Sung et al. 2023, https://arxiv.org/abs/2310.02998): each unit's importance
  ``sum |w * dL/dw|`` on the calibration loss (the next-token cross-entropy of the calibration inputs on
  themselves, whole model; `order` ``"zeroth"``: forward-only gradient estimates, ``"first"``: backprop),
  then keep fractions in proportion, within ``sparsity +- cap``.

A unit is one linear (``granularity="layer"``) or all selected linears of one block, a decoder layer or a
vision block (``"block"``, the papers' choice, sharing one sparsity). Every allocation keeps the
parameter-weighted mean of the allocated sparsities over the pruned linears equal to `sparsity`. Then
the local pruner (`local`: ``"wanda"``, ``"sparsegpt"``, ``"magnitude"``) zeroes each linear at its
sparsity, block by block on the outputs of the already-pruned blocks (`calibrate.blockwise`). An N:M
pattern (``nm="2:4"``) fixes every linear at ``1 - N/M`` and works with ``method="uniform"`` only::

    import vlmprune
    from vlmprune.weights import calibration_batches, prune_weights, save_pruned

    pm = vlmprune.load("testbed")
    batches = calibration_batches(pm.model, pm.processor, n=64)          # FashionScenes training scenes
    report = prune_weights(pm, batches, method="ecoflap", local="wanda", sparsity=0.6)
    print(report.summary())
    save_pruned(pm, pm.processor, report, "pruned-testbed")            # a normal transformers checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import VlmpruneError
from ..files import write_dir, write_json
from .allocation import allocate, first_order_scores, owl_scores, owl_sparsities, uniform, zeroth_order_scores
from .calibrate import VISION_BLOCKS, blockwise, dense_input_norms, find_stacks, model_inputs, select_linears
from .local import Pattern, apply_mask, magnitude_mask, sparsegpt_prune, wanda_mask

METHODS = ("uniform", "owl", "ecoflap")
LOCALS = ("wanda", "sparsegpt", "magnitude")
ORDERS = ("zeroth", "first")
GRANULARITIES = ("layer", "block")
DEFAULT_SPARSITY = 0.5
OWL_M = 5.0  # OWL's outlier threshold, in multiples of a unit's mean Wanda score


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VlmpruneError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class WeightPruneConfig:
    """What `prune_weights` does; every field is checked when built (the CLI builds one before loading).

    method: allocation, ``"uniform"``, ``"owl"`` or ``"ecoflap"``.
    local: local pruner, ``"wanda"``, ``"sparsegpt"`` or ``"magnitude"``.
    sparsity: the overall share of the pruned linears' weights to zero, in [0, 1); None: 0.5, or
        ``1 - N/M`` with `nm`.
    nm: an N:M pattern such as ``"2:4"`` (keep N of every M input columns); uniform only.
    order: ECoFLaP's importance, ``"zeroth"`` (forward passes only) or ``"first"`` (backprop).
    granularity: ``"block"`` (one sparsity per decoder layer / vision block) or ``"layer"`` (per linear).
    cap: how far a unit's sparsity may stray from the target (ECoFLaP's bound; OWL's lambda).
    patterns: module-name patterns of the linears to prune (fnmatch, or ``"re:"`` + a regex); None: all
        linears inside the blocks.
    seed: seeds ECoFLaP's zeroth-order directions.
    """

    method: str = "uniform"
    local: str = "wanda"
    sparsity: float | None = None
    nm: str | tuple[int, int] | None = None
    order: str = "zeroth"
    granularity: str = "block"
    cap: float = 0.1
    patterns: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("local", self.local, LOCALS)
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

    @property
    def target(self) -> float:
        if self.nm is not None:
            return Pattern(nm=self.nm).ratio
        return DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)

    @property
    def pattern_nm(self) -> tuple[int, int] | None:
        return None if self.nm is None else Pattern(nm=self.nm).nm


@dataclass
class SparsityReport:
    """What `prune_weights` did. ``achieved``: each pruned linear's share of exact zeros after pruning
    (full module name -> share); ``allocated``: the sparsity it was given; ``overall``: zeros / weights
    over all pruned linears. Local pruners round each count down (``floor``), so achieved can sit a few
    weights below allocated."""

    model_type: str
    method: str
    local: str
    target: float
    nm: str | None
    granularity: str
    order: str | None  # ECoFLaP only
    cap: float | None  # OWL and ECoFLaP only
    seed: int
    overall: float
    pruned_params: int
    allocated: dict[str, float]
    achieved: dict[str, float]
    calibration_samples: int
    calibration_batches: int
    seconds: float
    peak_memory_bytes: int | None  # CUDA only (torch.cuda.max_memory_allocated); None on CPU

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        what = f"{self.method} x {self.local}" + (f" {self.nm}" if self.nm else f" at sparsity {self.target:g}")
        values = list(self.achieved.values())
        lines = [
            f"{what}: {self.overall:.4f} of {self.pruned_params:,} weights in {len(values)} linears zeroed "
            f"(per linear {min(values):.3f} .. {max(values):.3f})",
            f"calibration: {self.calibration_samples} samples in {self.calibration_batches} batches, {self.seconds:.1f} s"
            + (f", peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB" if self.peak_memory_bytes else ""),
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


def _unwrap(model_or_pm) -> nn.Module:
    model = getattr(model_or_pm, "model", None) if not isinstance(model_or_pm, nn.Module) else model_or_pm
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise VlmpruneError(f"give a transformers model or a vlmprune PrunedModel, got {type(model_or_pm).__name__}")
    return model


def _check_batches(batches, needed: bool) -> list[Mapping]:
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
        raise VlmpruneError("calib_batches must be a list of model-input dicts (input_ids, attention_mask, pixel_values, ...)")
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise VlmpruneError(f"calibration batch {i} must be a dict with input_ids [batch, length] (and the model's other inputs)")
    if needed and not batches:
        raise VlmpruneError("this method needs calibration data; give at least one calibration batch")
    return list(batches)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def calibration_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """The model's next-token cross-entropy on the batch itself: ``labels`` = input_ids with padding and
    image placeholders set to -100 (or the batch's own ``labels``). A VLM runs whole, tower included."""
    inputs = model_inputs(model, batch)
    labels = batch.get("labels")
    if labels is None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(~mask.bool(), -100)
        image_id = getattr(model.config, "image_token_id", None)
        if image_id is not None:
            labels = labels.masked_fill(ids == image_id, -100)
    return model(**inputs, labels=labels, use_cache=False).loss


def _units(stacks, linears: Mapping[str, nn.Linear], granularity: str) -> list[tuple[str, list[str]]]:
    """(unit name, its linears' names): one per linear, or one per block holding a selected linear."""
    if granularity == "layer":
        return [(name, [name]) for name in linears]
    units = []
    for stack in stacks:
        for i in range(len(stack.blocks)):
            prefix = f"{stack.path}.{i}."
            names = [name for name in linears if name.startswith(prefix)]
            if names:
                units.append((f"{stack.path}.{i}", names))
    return units


def _allocation(cfg: WeightPruneConfig, model, batches, stacks, linears, units) -> list[float]:
    target = cfg.target
    sizes = [sum(linears[n].weight.numel() for n in names) for _, names in units]
    if cfg.method == "uniform" or target == 0:
        return uniform(len(units), target)
    if cfg.method == "owl":
        norms = dense_input_norms(model, batches, linears)
        lod = []
        for _, names in units:  # one unit's Wanda scores at a time: |W_ij| * ||X_j||
            scores = [linears[n].weight.detach().float().abs() * norms[n][None, :] for n in names]
            lod += owl_scores([scores], m=OWL_M)
        return owl_sparsities(lod, target, lam=cfg.cap, sizes=sizes)
    losses = [functools.partial(calibration_loss, model, b) for b in batches]
    params = [[linears[n].weight for n in names] for _, names in units]
    if cfg.order == "zeroth":
        totals = zeroth_order_scores(losses, params, seed=cfg.seed)
    else:
        totals = first_order_scores(losses, params)
    return allocate([t / n for t, n in zip(totals, sizes)], target, cap=cfg.cap, sizes=sizes)


def _prune_linear(linear: nn.Linear, local: str, stats, sparsity: float, nm) -> None:
    if not nm and sparsity == 0:
        return
    kw = dict(nm=nm) if nm else dict(sparsity=sparsity)
    if local == "magnitude":
        apply_mask(linear, magnitude_mask(linear.weight, **kw))
    elif local == "wanda":
        apply_mask(linear, wanda_mask(linear.weight, stats.norm, **kw))
    else:
        weight, _ = sparsegpt_prune(linear.weight, stats.hessian, **kw)
        with torch.no_grad():
            linear.weight.copy_(weight)


def _zero_share(linear: nn.Linear) -> float:
    return (linear.weight == 0).sum().item() / linear.weight.numel()


# ----------------------------------------------------------------------------- the pipeline


def prune_weights(
    model_or_pm,
    calib_batches: Sequence[Mapping],
    method: str = "uniform",
    local: str = "wanda",
    sparsity: float | None = None,
    nm: str | tuple[int, int] | None = None,
    order: str = "zeroth",
    granularity: str = "block",
    cap: float = 0.1,
    patterns: str | Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SparsityReport:
    """Prune the model's linears in place (see the module docstring and `WeightPruneConfig` for the
    options) and return a `SparsityReport`. `calib_batches` is a list of model-input dicts (what the
    model's forward takes: input_ids, attention_mask, pixel_values, ...; e.g. `calibration_batches`);
    magnitude pruning with uniform allocation needs none. Cost: one forward per batch per stack to
    capture block inputs, then two passes of each block (statistics, then the pruned outputs); OWL adds
    one forward per batch, ECoFLaP zeroth-order ``2 x units x batches`` forwards, first-order one
    backward per batch."""
    cfg = WeightPruneConfig(method, local, sparsity, nm, order, granularity, cap, patterns, seed)
    model = _unwrap(model_or_pm)
    batches = _check_batches(calib_batches, needed=not (cfg.method == "uniform" and cfg.local == "magnitude"))
    device = next(model.parameters()).device
    batches = [_to_device(b, device) for b in batches]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # dropout would make ECoFLaP's paired forwards disagree
    try:
        stacks = find_stacks(model)
        linears = select_linears(model, stacks, cfg.patterns)
        units = _units(stacks, linears, cfg.granularity)
        shares = _allocation(cfg, model, batches, stacks, linears, units)
        allocated = {name: float(s) for (_, names), s in zip(units, shares) for name in names}
        nm_pair = cfg.pattern_nm
        if cfg.local == "magnitude":  # needs no statistics, so no block replay
            for name, linear in linears.items():
                _prune_linear(linear, "magnitude", None, allocated[name], nm_pair)
        else:
            for step in blockwise(model, batches, linears, hessian=cfg.local == "sparsegpt", progress=progress):
                for name, linear in step.linears.items():
                    _prune_linear(linear, cfg.local, step.stats[name], allocated[name], nm_pair)
    finally:
        model.train(was_training)
    achieved = {name: _zero_share(m) for name, m in linears.items()}
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return SparsityReport(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        method=cfg.method,
        local=cfg.local,
        target=cfg.target,
        nm=None if nm_pair is None else f"{nm_pair[0]}:{nm_pair[1]}",
        granularity=cfg.granularity,
        order=cfg.order if cfg.method == "ecoflap" else None,
        cap=cfg.cap if cfg.method != "uniform" else None,
        seed=cfg.seed,
        overall=zeros / total,
        pruned_params=total,
        allocated=allocated,
        achieved=achieved,
        calibration_samples=sum(int(b["input_ids"].shape[0]) for b in batches),
        calibration_batches=len(batches),
        seconds=time.perf_counter() - start,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


# ----------------------------------------------------------------------------- loading and saving


def load_for_pruning(path_or_name) -> tuple[nn.Module, object]:
    """(model, processor or tokenizer): a supported VLM through `vlmprune.load` (``"testbed"`` too), any
    other checkpoint as a causal LM with its tokenizer (safetensors only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..loading import MODEL_CLASSES, _resolve, load

    location, _ = _resolve(path_or_name)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise VlmpruneError(f"cannot load a model config from {location!r}: {str(err).splitlines()[0]}") from err
    if config.model_type in MODEL_CLASSES:
        pm = load(path_or_name)
        return pm.model, pm.processor
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype="auto", use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise VlmpruneError(
            f"{location}: model_type {config.model_type!r} is neither a supported VLM nor a causal LM transformers can "
            f"load from safetensors: {str(err).splitlines()[0]}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model.eval(), tokenizer


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    """The output directory, refused if it exists (unless `overwrite`) or is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlmpruneError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not overwrite:
        raise VlmpruneError(f"{out} already exists; choose another --out, or pass --overwrite (overwrite=True) to replace it")
    return out


def plot_sparsity(report: SparsityReport, path) -> Path:
    """Bar chart of each pruned linear's achieved sparsity (model order; vision blocks apart), with the
    allocated sparsity and the target."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    names = list(report.achieved)
    vision = tuple(p + "." for p in VISION_BLOCKS.values())
    colors = ["tab:orange" if n.startswith(vision) else "tab:blue" for n in names]
    x = range(len(names))
    fig = Figure(figsize=(max(6.0, min(16.0, 0.06 * len(names) + 4)), 3.8))
    ax = fig.add_subplot()
    ax.bar(x, [report.achieved[n] for n in names], width=1.0, color=colors, linewidth=0)
    ax.step(x, [report.allocated[n] for n in names], where="mid", color="black", linewidth=0.8, label="allocated")
    ax.axhline(report.target, color="red", linestyle=":", linewidth=1, label=f"target {report.target:g}")
    ax.set_xlabel("pruned linear (model order; orange: vision tower)")
    ax.set_ylabel("sparsity (share of zeros)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.model_type}: {report.method} x {report.local}, overall {report.overall:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110)
    return path


def save_pruned(model_or_pm, processor_or_tokenizer, report: SparsityReport, out_dir, overwrite: bool = False) -> Path:
    """Write a normal transformers checkpoint (``save_pretrained``: config + safetensors, the processor or
    tokenizer beside it) plus ``sparsity.json`` (the report) and ``sparsity.png`` (skipped, with a note in
    the JSON, without matplotlib) to `out_dir`. Everything is written to a temporary sibling directory
    first and renamed into place, so a failure leaves neither a half-written `out_dir` nor the temporary
    one. An existing `out_dir` is refused unless ``overwrite=True``."""
    model = _unwrap(model_or_pm)
    out = check_out_dir(out_dir, overwrite)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if processor_or_tokenizer is not None:
            processor_or_tokenizer.save_pretrained(tmp)
        if importlib.util.find_spec("matplotlib") is None:
            plot = "skipped: matplotlib is not installed (pip install -e '.[plots]')"
        else:
            plot = plot_sparsity(report, tmp / "sparsity.png").name
        write_json(tmp / "sparsity.json", {**report.to_dict(), "plot": plot})

    return write_dir(out, write)
