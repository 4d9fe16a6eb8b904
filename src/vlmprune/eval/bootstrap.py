"""Paired bootstrap of an accuracy difference: is method A really better than method B on these questions?

    from vlmprune.eval.bootstrap import paired_bootstrap
    ci = paired_bootstrap(evaluate(pm, qs, prune=a).correct, evaluate(pm, qs, prune=b).correct)
    ci.diff, ci.low, ci.high, ci.excludes_zero

Both methods answered the same questions, so the questions are resampled *in pairs*: each resample
draws n question indices with replacement and takes mean(a) - mean(b) over them, which keeps the
correlation between the two runs (the same hard questions) out of the interval's width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..errors import VlmpruneError
from ..validate import check_integer, check_share

CHUNK = 1 << 20  # resampled indices drawn at once (bounds memory; the draws do not depend on it)


@dataclass(frozen=True)
class BootstrapInterval:
    """``diff`` = mean(a) - mean(b) on the questions as given; ``[low, high]`` its percentile interval
    at `level` from `resamples` paired resamples drawn with `seed`; `n` questions."""

    diff: float
    low: float
    high: float
    resamples: int
    seed: int
    level: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: the difference is significant at `level`."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def _scores(values: Sequence, name: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise VlmpruneError(f"{name} must be per-question correctness (bools or 0/1 numbers): {err}") from err
    if out.ndim != 1:
        raise VlmpruneError(f"{name} must be one flat sequence of per-question correctness, got shape {out.shape}")
    if not np.isfinite(out).all():
        raise VlmpruneError(f"{name} holds non-finite values; give per-question correctness (bools or 0/1)")
    return out


def tail_rank(resamples: int, level: float) -> int:
    """0-based rank of the interval's low end among the sorted resampled differences:
    ``floor(resamples * (1 - level) / 2)`` (to float tolerance, so 1000 at 0.9 gives 50, not 49)."""
    return min(int(math.floor(resamples * (1 - level) / 2 + 1e-9)), (resamples - 1) // 2)


def paired_bootstrap(a: Sequence, b: Sequence, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> BootstrapInterval:
    """The percentile interval of mean(a) - mean(b) under paired resampling of the questions.

    `a`, `b`: per-question correctness (bools or 0/1) of two runs on the same questions, in the same
    order. Each of the `resamples` resamples draws n indices with replacement from
    ``numpy.random.default_rng(seed).integers(0, n, size=n)`` (one draw after another) and records
    mean(a[idx]) - mean(b[idx]). With the differences sorted and ``j = tail_rank(resamples, level)``,
    ``low`` is the (j+1)-th smallest and ``high`` the (j+1)-th largest (no interpolation: both are
    differences some resample reached; R=1000 at 95% gives the 26th smallest and largest).
    """
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.shape != y.shape:
        raise VlmpruneError(f"a and b must score the same questions: a has {x.size} answers, b has {y.size}")
    n = x.size
    if n == 0:
        raise VlmpruneError("a and b are empty: give at least one question's correctness")
    check_integer(int(resamples) if isinstance(resamples, np.integer) else resamples,
                  f"resamples must be an integer >= 1, got {resamples!r}", 1)
    check_share("level", level, "give the interval's coverage, e.g. 0.95", allow_zero=False, allow_one=False)
    rng = np.random.default_rng(seed)
    diffs = np.empty(int(resamples))
    rows = max(1, CHUNK // n)
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))
        diffs[start : start + idx.shape[0]] = x[idx].mean(1) - y[idx].mean(1)
    diffs.sort()
    j = tail_rank(resamples, level)
    return BootstrapInterval(
        diff=float(x.mean() - y.mean()),
        low=float(diffs[j]),
        high=float(diffs[resamples - 1 - j]),
        resamples=int(resamples),
        seed=seed,
        level=float(level),
        n=int(n),
    )
