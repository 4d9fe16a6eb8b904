"""Weight pruning: allocation x local pruner x calibration data (see DESIGN.md), and the pipeline
(`prune_weights`) that calibrates block by block, and loading / saving (`checkpoints.py`)."""

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
from .prune import SparsityReport, WeightPruneConfig, calibration_loss, prune_weights

__all__ = [
    "BlockStep",
    "InputStats",
    "Pattern",
    "SparsityReport",
    "WeightPruneConfig",
    "allocate",
    "apply_mask",
    "block_sizes",
    "blockwise",
    "calibration_batches",
    "calibration_loss",
    "check_out_dir",
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
    "save_pruned",
    "scene_batches",
    "select_linears",
    "select_keep",
    "sparsegpt_prune",
    "text_batches",
    "uniform",
    "wanda_mask",
    "zeroth_order_scores",
]
