"""Model-family adapters, registered by ``config.model_type``. Adding a family: one file, one line here."""

from __future__ import annotations

from torch import nn

from ..errors import VlmpruneError
from .base import Adapter, DecoderLayout, PreparedInputs, VisionScores
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {}

SUPPORTED_CLASSES = (
    "LlavaForConditionalGeneration (LLaVA-1.5)",
    "LlavaNextForConditionalGeneration (LLaVA-NeXT)",
    "Qwen2VLForConditionalGeneration (Qwen2-VL)",
    "Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL)",
)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for family in cls.families:
        if family in ADAPTERS:
            raise ValueError(f"model family {family!r} is already registered by {ADAPTERS[family].__name__}")
        ADAPTERS[family] = cls
    return cls


register_adapter(LlavaAdapter)
register_adapter(Qwen2VLAdapter)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a transformers vision-language model, or a clear error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS or not hasattr(model, "lm_head"):
        raise VlmpruneError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; vlmprune supports "
            + ", ".join(SUPPORTED_CLASSES)
        )
    return ADAPTERS[model_type](model)


__all__ = ["Adapter", "DecoderLayout", "PreparedInputs", "VisionScores", "adapter_for", "register_adapter", "ADAPTERS"]
