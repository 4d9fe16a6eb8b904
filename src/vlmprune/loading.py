"""`load` a checkpoint (local directory, the bundled testbed, or a hub id) and `wrap` a built model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import VlmpruneError
from .models import SUPPORTED_CLASSES
from .pruned_model import PrunedModel

# config.model_type -> the transformers class that loads it (data, not branches)
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def wrap(model: nn.Module, processor: Any = None) -> PrunedModel:
    """Wrap an already-built transformers VLM (weights shared). Unsupported classes get a clear error."""
    return PrunedModel(model, processor)


def _resolve(path_or_name: str | os.PathLike) -> tuple[str, bool]:
    """(location, is_local)."""
    text = str(path_or_name)
    if text == "testbed":
        from .testbed import checkpoint_dir  # imported lazily: the testbed is optional at import time

        return str(checkpoint_dir()), True
    local = Path(text).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise VlmpruneError(f"{local} has no config.json; point --model at a transformers checkpoint directory")
        return str(local), True
    return text, False


def load(
    path_or_name: str | os.PathLike,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> PrunedModel:
    """Load a supported VLM checkpoint and its processor, and wrap it.

    ``path_or_name``: a local checkpoint directory, ``"testbed"`` (the bundled model), or a hub id
    (needs internet). Weights are read from safetensors only; `trust_remote_code` stays off unless asked.
    """
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoProcessor

    location, is_local = _resolve(path_or_name)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = "" if is_local else " (not a local directory, and the hub could not be reached or has no such model)"
        raise VlmpruneError(f"cannot load a model config from {location!r}{hint}: {str(err).splitlines()[0]}") from err
    cls_name = MODEL_CLASSES.get(config.model_type)
    if cls_name is None:
        raise VlmpruneError(
            f"{location}: model_type {config.model_type!r} is not supported; vlmprune supports "
            + ", ".join(SUPPORTED_CLASSES)
        )
    cls = getattr(transformers, cls_name)
    try:
        model = cls.from_pretrained(
            location,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise VlmpruneError(
            f"cannot load weights from {location!r}: {str(err).splitlines()[0]} "
            "(vlmprune reads safetensors only; a corrupt or partial checkpoint must be re-saved)"
        ) from err
    try:
        processor = AutoProcessor.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        processor = None
    return PrunedModel(model, processor)
