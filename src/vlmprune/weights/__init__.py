"""Weight pruning: allocation x local pruner x calibration data (see DESIGN.md). Local pruners so far."""

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
    "apply_mask",
    "magnitude_mask",
    "parse_nm",
    "prune_count",
    "select_keep",
    "sparsegpt_prune",
    "wanda_mask",
]
