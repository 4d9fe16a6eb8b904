"""Peak memory measurement moved to `vlmprune.memory` (below weights, which measures pruning with it);
re-exported here for callers of ``vlmprune.eval.memory``."""

from ..memory import SAMPLE_INTERVAL_S, peak_memory_growth  # noqa: F401 (re-exported)
