"""Model-family adapters, registered by ``config.model_type`` (`registry`). Adding a family: one file
with its `Adapter` subclass, decorated with `register_family`, and one import line here (or, outside
the package, an import of the user's module before use)."""

from __future__ import annotations

from .base import Adapter, DecoderLayout, PreparedInputs, VisionScores
from .registry import FAMILIES, adapter_for, family, find_family, register_family, supported
from .llava import LlavaAdapter, LlavaNextAdapter  # each registers itself
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

__all__ = [
    "Adapter", "DecoderLayout", "PreparedInputs", "VisionScores", "FAMILIES", "adapter_for", "family", "find_family",
    "register_family", "supported", "LlavaAdapter", "LlavaNextAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter",
]
