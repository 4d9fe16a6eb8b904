"""The model-family registry: ``config.model_type`` -> the family's adapter class, which carries
everything vlmprune knows about the family (see `Adapter`). Loading, flops, weight calibration, the
processor fallback and Downsample all ask here; duplicates fail loudly, unknown types list the
registered families."""

from __future__ import annotations

from torch import nn

from ..errors import VlmpruneError
from ..registry import Registry
from .base import Adapter

FAMILIES: Registry[type[Adapter]] = Registry("model family", "model_type")
REQUIRED = ("model_type", "model_class", "label", "vision_blocks", "vision_cost")


def register_family(cls: type[Adapter]) -> type[Adapter]:
    """Register the adapter class `cls` as the family of ``cls.model_type`` (usable as a decorator).

    `cls` subclasses `Adapter`, implements ``prepare`` and sets every attribute in `REQUIRED`; a
    model_type registered already is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise VlmpruneError(f"register_family takes an Adapter subclass, got {cls!r}")
    missing = [name for name in REQUIRED if not getattr(cls, name)]
    if cls.prepare is Adapter.prepare:
        missing.append("prepare")
    if missing:
        raise VlmpruneError(f"{cls.__name__} cannot be registered as a model family: it does not set {', '.join(missing)}")
    if cls.model_type in FAMILIES:
        raise VlmpruneError(
            f"model family {cls.model_type!r} is already registered by {FAMILIES[cls.model_type].__name__}; "
            f"give {cls.__name__} its own model_type"
        )
    FAMILIES.add(cls.model_type, cls)
    return cls


def supported() -> str:
    """The registered families as messages list them, e.g. ``LlavaForConditionalGeneration (LLaVA-1.5), ...``."""
    return ", ".join(cls.description() for cls in FAMILIES.values())


def find_family(model_type: str | None) -> type[Adapter] | None:
    """The adapter class registered for `model_type`, or None."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def family(model_type: str | None, what: str = "") -> type[Adapter]:
    """The adapter class registered for `model_type`; else a `VlmpruneError` that lists the registered
    families (`what` names the thing refused, e.g. a checkpoint's location)."""
    found = find_family(model_type)
    if found is None:
        raise VlmpruneError(f"{what}model_type {model_type!r} is not supported; vlmprune supports {supported()}")
    return found


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a transformers vision-language model, or a clear error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    found = find_family(model_type)
    if found is None or not hasattr(model, "lm_head"):
        raise VlmpruneError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported; vlmprune supports {supported()}"
        )
    return found(model)
