"""A pruning decision from method names and options: what the CLI's ``--method --keep ... --flops``
flags and lmms-eval's ``model_args`` both build, so the two can never disagree."""

from __future__ import annotations

from typing import Any

from .errors import VlmpruneError


def at_flops(method, share: float | None):
    """`method` budgeted to `share` of the full LM prefill FLOPs (unchanged when `share` is None)."""
    from .methods.budget import AtFlops

    return method if share is None else AtFlops(method, share)


def check_flops_budget(names: str, options: dict) -> None:
    """A FLOPs target picks the one method's budget: refuse several methods, or a budget given as well
    (every method's budget field has a valid default, which the target replaces)."""
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if len(listed) != 1:
        raise VlmpruneError("a FLOPs budget (--flops, or flops= in model_args) sets the budget of one method; give a single --method")
    if options.get("keep") is not None or options.get("keep_layers") is not None:
        raise VlmpruneError("a FLOPs budget chooses the budget itself; leave out --keep / --keep-layers (keep / keep_layers in model_args)")


def calibration_inputs(pm, n: int = 64, source: str | None = None, read_options: dict | None = None) -> list[dict]:
    """Calibration inputs (ShortGPT): `n` rows of `source` (read like ``--data``), or FashionScenes training
    scenes (never the evaluation split) for the testbed; any other model must be given a source."""
    from .data import example_batches, image_channels, read_examples, take
    from .testbed.recipe import is_recipe

    if source and source != "testbed":
        examples = take(read_examples(source, **(read_options or {})), n, "--calib", source)
        return example_batches(pm.processor, examples, 16, image_channels(pm.config), with_answer=True)
    if not is_recipe(pm.config, pm.processor):
        raise VlmpruneError("this method calibrates on data: pass --calib-data FILE (JSONL rows {\"image\": PATH, "
                            "\"prompt\": TEXT}, a folder of images with --prompt, a .parquet file or hf:NAME); "
                            "FashionScenes is the default only for the testbed")
    from .data.calibration import CALIBRATION_SEED, scene_batches

    return scene_batches(pm.processor.tokenizer, n, seed=CALIBRATION_SEED)


def build_decision(method: str, options: dict[str, Any] | None = None, flops: float | None = None, pm=None,
                   calibration=None):
    """The methods named in `method` (comma-separated), each taking the `options` its dataclass has
    (None = not given), budgeted by `flops` when given.

    Without `pm` only the names and options are checked (fast, before a slow load). With `pm`, methods
    that calibrate are calibrated on ``calibration(pm)`` (default: `calibration_inputs` with its defaults).
    Returns one method or a list of them.
    """
    from .methods.protocols import Calibrates
    from .methods.registry import configure

    options = dict(options or {})
    if flops is not None:
        check_flops_budget(method, options)
    configured = configure(method, **options)
    if pm is None:
        return at_flops(configured, flops)  # a FLOPs budget is refused for several methods above
    methods = configured if isinstance(configured, list) else [configured]
    calibrate = calibration or calibration_inputs
    methods = [m.calibrate(pm, calibrate(pm)) if isinstance(m, Calibrates) else m for m in methods]
    methods = [at_flops(m, flops) for m in methods]
    return methods[0] if len(methods) == 1 else methods
