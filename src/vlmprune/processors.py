"""Loading a checkpoint's processor, with an image-and-text fallback where torchvision is missing for
the families whose processor has a video sub-processor (``Adapter.processor_class``: Qwen2-VL,
Qwen2.5-VL; transformers 5.23 builds their video processor on torchvision, and without it cannot load
or even build the processor, though images and text need none of it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .models import find_family


def load_processor(location: str, model_type: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor, or None if it has none that loads."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError):
        if video_processor_class(model_type) is not None and importlib.util.find_spec("torchvision") is None:
            return image_text_processor(location, model_type)
        return None


def video_processor_class(model_type: str) -> str | None:
    """The name in ``transformers`` of the family's processor class that has a video sub-processor, or None."""
    entry = find_family(model_type)
    return entry.processor_class if entry is not None else None


def image_text_processor(location: str, model_type: str) -> Any:
    """The family's own processor class without its video sub-processor (images and text only, as
    vlmprune uses them): the checkpoint's image processor, tokenizer and chat template."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    base = getattr(transformers, video_processor_class(model_type))
    cls = type(base.__name__, (base,), {
        "__module__": base.__module__,
        "__doc__": f"{base.__name__} for images and text only (no video processor: torchvision is not installed).",
        "get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"]),
        "video_processor": None,
    })
    try:
        image_processor = AutoImageProcessor.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    template_file = Path(location) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else _json_template(Path(location))
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template or tokenizer.chat_template)


def _json_template(location: Path) -> str | None:
    for name in ("chat_template.json", "processor_config.json"):
        file = location / name
        if file.is_file():
            value = json.loads(file.read_text()).get("chat_template")
            if value:
                return value
    return None
