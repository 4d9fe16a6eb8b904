"""The embedded default: FashionScenes VQA data and the small LLaVA trained on it (issue 3)."""

from __future__ import annotations

from pathlib import Path

from ..errors import VlmpruneError

ASSETS = Path(__file__).parent / "assets"


def checkpoint_dir() -> Path:
    """The shipped testbed checkpoint."""
    path = ASSETS / "model"
    if not (path / "config.json").is_file():
        raise VlmpruneError(
            "the bundled testbed checkpoint is not in this build yet; train it with `vlmprune testbed train` "
            "or pass --model PATH to a transformers checkpoint"
        )
    return path
