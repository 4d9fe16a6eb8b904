"""The embedded default: FashionScenes VQA data and the small LLaVA trained on it (issue 3)."""

from __future__ import annotations

from pathlib import Path

from ..errors import VlmpruneError

ASSETS = Path(__file__).parent / "assets"


EVAL_SET = ASSETS / "eval.npz"


def eval_set(limit: int | None = None):
    """The shipped FashionScenes evaluation set (2000 test-split scenes, seed 0), optionally its first `limit`."""
    from .data import load_set

    samples = load_set(EVAL_SET)
    if limit is not None:
        if limit < 1:
            raise VlmpruneError(f"--limit must be >= 1, got {limit}")
        samples = samples[:limit]
    return samples


def checkpoint_dir() -> Path:
    """The shipped testbed checkpoint."""
    path = ASSETS / "model"
    if not (path / "config.json").is_file():
        raise VlmpruneError(
            "the bundled testbed checkpoint is not in this build yet; train it with `vlmprune testbed train` "
            "or pass --model PATH to a transformers checkpoint"
        )
    return path
