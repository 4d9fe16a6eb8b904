"""Weight pruning: allocation x local pruner x calibration data (see DESIGN.md). Local pruners so far."""

from .allocation import (
    allocate,
    block_sizes,
    first_order_scores,
    owl_scores,
    owl_sparsities,
    uniform,
    zeroth_order_scores,
)
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

__all__ = [
    "InputStats",
    "Pattern",
    "allocate",
    "apply_mask",
    "block_sizes",
    "first_order_scores",
    "magnitude_mask",
    "owl_scores",
    "owl_sparsities",
    "parse_nm",
    "prune_count",
    "select_keep",
    "sparsegpt_prune",
    "uniform",
    "wanda_mask",
    "zeroth_order_scores",
]
