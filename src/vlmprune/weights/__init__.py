"""Weight pruning: allocation x local pruner x calibration data (see DESIGN.md), and the pipeline
(`prune_weights(model, batches, cfg)`) that calibrates block by block, and loading / saving
(`checkpoints.py`). Allocations and local pruners are registered kernels (`registry.py`)."""

from .allocation import (
    allocate,
    block_sizes,
    ecoflap_allocate,
    ecoflap_keep_counts,
    first_order_scores,
    owl_scores,
    owl_sparsities,
    uniform,
    zeroth_order_scores,
)
from ..data.calibration import calibration_batches, scene_batches, text_batches
from .calibrate import BlockStep, blockwise, dense_input_norms, find_stacks, select_linears
from .local import (
    InputStats,
    Pattern,
    apply_mask,
    magnitude_mask,
    parse_nm,
    prune_count,
    select_keep,
    sparsegpt_prune,
    wanda_mask,
)
from .checkpoints import check_out_dir, load_for_pruning, load_gguf, save_pruned
from .config import WeightPruneConfig, config_from
from .prune import SparsityReport, prune_weights, sparsities_from_scores, unit_sparsities
from .samples import calibration_loss
from .registry import ALLOCATIONS, PRUNERS, AllocationInputs, Pruned, Unit, register_allocation, register_pruner

__all__ = [
    "ALLOCATIONS",
    "AllocationInputs",
    "BlockStep",
    "InputStats",
    "PRUNERS",
    "Pattern",
    "Pruned",
    "SparsityReport",
    "Unit",
    "WeightPruneConfig",
    "allocate",
    "apply_mask",
    "block_sizes",
    "blockwise",
    "calibration_batches",
    "calibration_loss",
    "check_out_dir",
    "config_from",
    "dense_input_norms",
    "ecoflap_allocate",
    "ecoflap_keep_counts",
    "find_stacks",
    "first_order_scores",
    "load_for_pruning",
    "load_gguf",
    "magnitude_mask",
    "owl_scores",
    "owl_sparsities",
    "parse_nm",
    "prune_count",
    "prune_weights",
    "register_allocation",
    "register_pruner",
    "save_pruned",
    "scene_batches",
    "select_linears",
    "select_keep",
    "sparsegpt_prune",
    "sparsities_from_scores",
    "text_batches",
    "uniform",
    "unit_sparsities",
    "wanda_mask",
    "zeroth_order_scores",
]
